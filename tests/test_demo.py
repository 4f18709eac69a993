"""`make demo` runs end to end (here on a small config) and reports what it made."""

from __future__ import annotations

import json

from mixmodal.demo import main

# the computed tokenizers fitted on 100 images instead of 4,000 (the demo passes these to both tokenizer runs)
FAST_TOKENIZERS = "[data.num_images=100,eval.num_images=8,eval.num_samples=4]"


def test_small_demo_runs_and_lists_its_outputs(tmp_path, capsys):
    from mixmodal.eval.feature_net import train_feature_net

    features = tmp_path / "features"
    train_feature_net(64, steps=2, batch_size=4, out=features, num_eval_scenes=8)  # the real one trains for ~30 s
    out = tmp_path / "demo"
    code = main(["--out", str(out), "num_train=40", "num_heldout=20", "num_shown=8",
                 "text_tokenizer.vocab_size=400", f"tokenizer_overrides={FAST_TOKENIZERS}", "model_steps=2", "num_prompts=2",
                 "geneval_prompts=1",
                 "diffusion_steps=2", "eval_num=2", f"feature_net={features}"])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "contact_sheet_train.png", "tokenizer.json", "oracle.json", "stats.json",
                 "loss_curves.png", "runs/tokens/model", "runs/latents/model", "generate/tokens/index.html",
                 "generate/latents/index.html"):
        assert name in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == 40
    oracle = json.loads((out / "oracle.json").read_text())
    assert oracle["heldout"]["images"] >= 20
    assert (out / "report.md").read_text().startswith("# mixmodal demo report")
    assert (out / "runs" / "tokens" / "model" / "model.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "token model" in report and "latent model" in report and "computed in" in report  # the patch tokenizers
    assert json.loads((out / "runs" / "vq" / "eval.json").read_text())["fit_images"] == 100  # the overrides reached it
    for model in ("tokens", "latents"):
        assert (out / "generate" / model / "documents.jsonl").read_text().count("\n") == 2
    assert "## Generation" in (out / "report.md").read_text()
    # ... and ends with a short eval of each model, whose reports it lists
    assert "eval reports" in printed and str(out / "eval" / "latents" / "report.html") in printed
    for model in ("tokens", "latents"):
        metrics = json.loads((out / "eval" / model / "metrics.json").read_text())
        assert metrics["text_to_image"]["heldout"]["n"] == 2 and metrics["training"]["steps"] == 2
        assert len(metrics["geneval"]["heldout"]["categories"]) == 6
    assert "## Evaluation" in (out / "report.md").read_text()
    assert "GenEval-form overall" in (out / "report.md").read_text()
    # a second `make demo` into the same folder starts its runs afresh instead of refusing
    assert main(["--out", str(out), "num_train=40", "num_heldout=20", "num_shown=8",
                 "text_tokenizer.vocab_size=400", f"tokenizer_overrides={FAST_TOKENIZERS}", "model_steps=2", "num_prompts=1",
                 "geneval_prompts=1",
                 "diffusion_steps=2", "eval_num=1", f"feature_net={features}"]) == 0
