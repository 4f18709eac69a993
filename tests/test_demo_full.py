"""`make demo-full`'s runner: a finished run is kept, an interrupted one resumed, a new one started."""

from __future__ import annotations

from mixmodal import demo_full


def test_train_keeps_finished_runs_resumes_interrupted_ones_and_starts_new_ones(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo_full, "_run", lambda argv, capture=False: calls.append(argv))
    finished, interrupted, new = tmp_path / "finished", tmp_path / "interrupted", tmp_path / "new"
    finished.mkdir()
    (finished / "eval.json").write_text("{}")
    (interrupted / "checkpoints" / "step_000100").mkdir(parents=True)
    demo_full._train("configs/recipes/tokens-48.yaml", finished)
    demo_full._train("configs/recipes/tokens-48.yaml", interrupted, "data.image_tokenizer=/x")
    demo_full._train("configs/recipes/tokens-48.yaml", new)
    assert len(calls) == 2
    assert "--resume" in calls[0] and calls[0][-1] == "data.image_tokenizer=/x" and str(interrupted) in calls[0]
    assert "--resume" not in calls[1] and str(new) in calls[1]
    assert all(c[0] == "train" and c[1].endswith("configs/recipes/tokens-48.yaml") for c in calls)


def test_every_path_names_configs_that_exist():
    for tokenizer, _, recipe, _ in demo_full.PATHS.values():
        assert (demo_full.ROOT / tokenizer).is_file() and (demo_full.ROOT / recipe).is_file()
