"""The eval report: OUT/report.md and OUT/report.html from the metrics and the samples behind
them, with figures (attribute accuracies, sample grids) and the sample images as PNGs.

    OUT/metrics.json                    every number (written by the suite)
    OUT/report.md, OUT/report.html      the same numbers as tables, with the figures
    OUT/figures/geneval.png             GenEval-form accuracy per category and prompt set
    OUT/figures/geneval-SET.png         per category, generated images with their verdicts
    OUT/figures/attributes.png          text -> image oracle accuracy per attribute and split
    OUT/figures/samples-SPLIT.png       generated images with their prompts (green: whole scene right)
    OUT/samples/SPLIT/NNNN.png          every generated image
    OUT/captioning/NNNN.png             the captioned images (the HTML shows them with the captions)
"""

from __future__ import annotations

import html
import os
import textwrap
from pathlib import Path

ATTRIBUTES = ("count", "colour", "shape", "size", "position", "overall")


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _flops(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def attribute_figure(metrics: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(metrics["text_to_image"])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(len(splits), 1)
    for k, split in enumerate(splits):
        values = [metrics["text_to_image"][split].get(a) or 0.0 for a in ATTRIBUTES]
        xs = [i + (k - (len(splits) - 1) / 2) * width for i in range(len(ATTRIBUTES))]
        bars = ax.bar(xs, values, width, label=split)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(ATTRIBUTES)), ATTRIBUTES)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("oracle accuracy")
    n = metrics["config"]
    ax.set_title(f"text -> image, {n['min_objects']}-{n['max_objects']} objects, cfg {metrics['sampling']['cfg']}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    return _save_with_command(fig, path, metrics.get("command", ""))


def _save_with_command(fig, path: Path, command: str, margin: float = 0.06, fontsize: float = 5.5) -> Path:
    """Save a figure with the command that made it along its bottom edge."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, margin if command else 0, 1, 1))
    if command:
        fig.text(0.01, margin / 6, textwrap.shorten(command, 150), fontsize=fontsize, color="gray")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grid(samples: list, path: Path, columns: int = 4, limit: int = 16, command: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in samples if s["image"] is not None][:limit]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 2.2, rows * 2.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown):
        ax.imshow(s["image"])
        ok = s["scores"]["overall"] == 1.0
        ax.set_title("\n".join(textwrap.wrap(s["prompt"], 28)[:4]), fontsize=6.5, color="green" if ok else "black")
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_color("green" if ok else "red")
    return _save_with_command(fig, path, command, margin=0.04, fontsize=5)


def geneval_figure(metrics: dict, path: Path) -> Path:
    """Accuracy per GenEval category, one bar per prompt set, with the overall means in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixmodal.data.shapes.geneval import CATEGORIES  # late: numpy, PIL, scipy; report.py loads on the stdlib

    sets = metrics["geneval"]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    width = 0.8 / max(len(sets), 1)
    for k, (name, m) in enumerate(sets.items()):
        xs, values = [], []
        for i, c in enumerate(CATEGORIES):
            if c in m["categories"]:
                xs.append(i + (k - (len(sets) - 1) / 2) * width)
                values.append(m["categories"][c]["accuracy"])
        bars = ax.bar(xs, values, width, label=f"{name} (overall {m['overall']:.2f})")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(CATEGORIES)), [c.replace("_", " ") for c in CATEGORIES], fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("GenEval-form accuracy")
    ax.set_title(f"text -> image, {_sampling_text(metrics)}", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=len(sets))
    return _save_with_command(fig, path, metrics.get("command", ""))


def geneval_grid(samples: dict, path: Path, columns: int = 6, command: str = "") -> Path:
    """One row per category: the first image of its first prompts, titled with the prompt and
    the verdict (green: correct; red: wrong, with GenEval's reason)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(samples)
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 1.9, len(rows) * 2.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, category in enumerate(rows):
        # one image of each prompt first (a greedy sampler draws the same image for every seed)
        ordered = sorted(samples[category], key=lambda s: (s.get("seed_index", 0), s.get("prompt_index", 0)))
        shown = [s for s in ordered if s["image"] is not None][:columns]
        for c, s in enumerate(shown):
            ax = axes[r, c]
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(s["image"])
            ok = s["correct"] == 1.0
            verdict = "correct" if ok else "; ".join(s["reasons"])[:60]
            prompt = s["prompt"].removeprefix("a photo of ")
            ax.set_title("\n".join(textwrap.wrap(prompt, 24)[:2] + textwrap.wrap(verdict, 28)[:2]), fontsize=5.5,
                         color="green" if ok else "firebrick")
            for spine in ax.spines.values():
                spine.set_color("green" if ok else "red")
                spine.set_linewidth(2)
            if c == 0:
                ax.set_ylabel(category, fontsize=7)
    return _save_with_command(fig, path, command, margin=0.03, fontsize=5)


def describe_sampling(settings: dict, mode: str) -> str:
    """One line for a text -> image sampling setting (eval reports and sweep tables)."""
    if settings.get("plan"):
        return (f"a written plan (full caption, text temperature {settings.get('plan_temperature', 1.0)}), then "
                + describe_sampling({**settings, "plan": False}, mode))
    if mode == "latents":
        interval = settings.get("guidance_interval")
        return (f"cfg {settings['cfg']}" + (f" for {interval[0]} < t <= {interval[1]}" if interval else "")
                + f", {settings['diffusion_steps']} denoising steps"
                + (f" in each of {settings['patch_groups']} turns" if (settings.get("patch_groups") or 1) > 1 else ""))
    if settings.get("cdk"):
        return f"CD-K, image temperature {settings['image_temperature']}"
    plausible = f", plausibility {settings['plausibility']}" if settings.get("plausibility") else ""
    return (f"cfg {settings['cfg']}{plausible}, image temperature {settings['image_temperature']}, "
            f"top-k {settings['image_top_k'] or 'off'}, top-p {settings['image_top_p']}")


def _sampling_text(metrics: dict) -> str:
    return describe_sampling(metrics["sampling"], metrics["image_mode"]) if metrics.get("sampling") else ""


def _save_images(items: list, key: str, folder: Path) -> list[str | None]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, item in enumerate(items):
        image = item.get(key)
        if image is None:
            names.append(None)
            continue
        p = folder / f"{i:04d}.png"
        image.save(p)
        names.append(p.as_posix())
    return names


def headline(metrics: dict) -> dict:
    """The numbers a reader looks for first (what `mixmodal eval` prints): GenEval-form accuracy per
    prompt set and category, text -> image oracle accuracy / FID / CLIP score per split, captioning,
    VQA, text perplexity, training FLOPs."""
    out: dict = {}
    for which, m in metrics.get("geneval", {}).items():
        out[f"geneval_{which}_overall"] = round(m["overall"], 4)
        for category, c in m["categories"].items():
            out[f"geneval_{which}_{category}"] = round(c["accuracy"], 4)
    for split, m in metrics.get("text_to_image", {}).items():
        out[f"t2i_{split}_overall"] = round(m["overall"], 4)
        if "fid" in m:
            out[f"t2i_{split}_fid"] = round(m["fid"]["fid"], 3)
        if "clip_score" in m:
            out[f"t2i_{split}_clip_score"] = round(m["clip_score"]["clip_score"], 3)
    if "captioning" in metrics:
        out["caption_cider"] = round(metrics["captioning"]["cider"], 4)
        out["caption_bleu4"] = round(metrics["captioning"]["bleu4"], 4)
    if "vqa" in metrics:
        out["vqa_accuracy"] = round(metrics["vqa"]["accuracy"], 4)
    if "text" in metrics:
        out["text_perplexity"] = round(metrics["text"]["perplexity"], 4)
    out["training_flops"] = metrics.get("training", {}).get("flops")
    return out


def write_report(out: Path, metrics: dict, artifacts: dict) -> dict[str, Path]:
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}
    if metrics.get("geneval"):
        paths["geneval"] = geneval_figure(metrics, figures / "geneval.png")
        for which, samples in artifacts.get("geneval", {}).items():
            paths[f"geneval-{which}"] = geneval_grid(samples, figures / f"geneval-{which}.png",
                                                     command=metrics.get("command", ""))
    t2i = artifacts.get("text_to_image", {})
    if t2i:
        paths["attributes"] = attribute_figure(metrics, figures / "attributes.png")
        for split, samples in t2i.items():
            paths[f"samples-{split}"] = sample_grid(samples, figures / f"samples-{split}.png",
                                                    limit=metrics["config"].get("samples", 16),
                                                    command=metrics.get("command", ""))
            _save_images(samples, "image", out / "samples" / split)
    caption_files = _save_images(artifacts.get("captioning", [])[:24], "image", out / "captioning")
    md = _markdown(metrics, paths, out)
    paths["markdown"].write_text(md, encoding="utf-8")
    paths["html"].write_text(_html(metrics, paths, out, artifacts, caption_files), encoding="utf-8")
    return paths


def _rel(path: Path | str, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _sections(metrics: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for every table of the report; markdown and HTML share them."""
    out = []
    tr = metrics.get("training", {})
    out.append(("Model", ["checkpoint", "image mode", "parameters", "training FLOPs", "steps", "tokens (positions)"],
                [[metrics["checkpoint"], metrics["image_mode"], f"{metrics['parameters']:,}", _flops(tr.get("flops")),
                  _fmt(tr.get("steps")), _fmt(tr.get("positions"))]],
                tr.get("note", "FLOPs: the model's own accounting (forward + backward per position, attention "
                               "included), every packed position of every step; the image tokenizer is not counted.")))
    if metrics.get("geneval"):
        from mixmodal.data.shapes.geneval import CATEGORIES  # late: as in geneval_figure

        sets = metrics["geneval"]
        rows = []
        for c in CATEGORIES:
            row = [c]
            for m in sets.values():
                cat = m["categories"].get(c)
                row += [_fmt(cat["accuracy"]) if cat else "n/a", f"{cat['images']} ({cat['distinct_prompts']})" if cat else ""]
            rows.append(row)
        rows.append(["**overall**", *[v for m in sets.values() for v in (f"**{_fmt(m['overall'])}**", "")]])
        header = ["category", *[h for name in sets for h in (name, "images (distinct prompts)")]]
        k = next(iter(sets.values()))["images_per_prompt"]
        out.append(("Text to image: GenEval-form accuracy", header, rows,
                    f"{k} images per prompt, {_sampling_text(metrics)}. An image is correct when the oracle finds what "
                    "the prompt names (GenEval's rules: counts, colours, relations on object centres, no more than the "
                    "counted number); overall = the mean of the categories. heldout-combos: prompts naming a held-out "
                    "shape-colour pair (only colors and color_attr name colours). docs/eval.md."))
    if "text_to_image" in metrics:
        rows = []
        for split, m in metrics["text_to_image"].items():
            rows.append([split, str(m["n"]), *[_fmt(m.get(a)) for a in ATTRIBUTES]])
            for n_obj, sub in m.get("by_objects", {}).items():
                rows.append([f"{split}, {n_obj} object(s)", "", *[_fmt(sub.get(a)) for a in ATTRIBUTES]])
        out.append(("Text to image: full-scene oracle accuracy (stricter)", ["split", "prompts", *ATTRIBUTES], rows,
                    f"One image per held-out full caption (every object's shape, colour, size and cell), "
                    f"{_sampling_text(metrics)}. overall = the parsed scene equals the prompt's scene exactly."))
        fid_rows, clip_rows = [], []
        for split, m in metrics["text_to_image"].items():
            if "fid" in m:
                f = m["fid"]
                fid_rows.append([split, _fmt(f["fid"], 2), _fmt(f.get("floor"), 2), str(f["n_fake"]), str(f["n_real"]),
                                 f["features"], "yes" if f["comparable"] else "NO"])
            if "clip_score" in m:
                cs = m["clip_score"]
                clip_rows.append([split, _fmt(cs["clip_score"], 2), _fmt(cs["real_images"], 2), str(cs["n"])])
        if fid_rows:
            out.append(("Text to image: FID", ["split", "FID", "floor (other real renders)", "generated", "reference renders",
                                               "features", "comparable to Inception FID"], fid_rows,
                        "floor: the FID of as many renders of other scenes of the split as there are generated images, "
                        "against the same reference set: what a perfect generator scores with this few samples "
                        "(FID is biased upwards when there are fewer images than feature dimensions)."))
        if clip_rows:
            out.append(("Text to image: CLIP score", ["split", "generated", "real renders", "pairs"], clip_rows,
                        "100 x max(cos(image, text), 0) with the given dual encoder (torchmetrics' CLIPScore definition)."))
    if "captioning" in metrics:
        m = metrics["captioning"]
        o = m["oracle"]
        out.append(("Image to text: captioning", ["images", "CIDEr-D", "BLEU-4", "parsable", "scene count", "colour",
                                                  "shape", "position", "scene exact"],
                    [[str(m["n"]), _fmt(m["cider"]), _fmt(m["bleu4"]), _fmt(m["parsable"]), _fmt(o["count"]),
                      _fmt(o["colour"]), _fmt(o["shape"]), _fmt(o["position"]), _fmt(o["overall"])]],
                    f"Greedy captions of held-out images against {metrics['config']['num_references']} reference "
                    "captions each; the oracle columns parse the caption back into a scene."))
    if "vqa" in metrics:
        m = metrics["vqa"]
        rows = [["all", str(m["n"]), _fmt(m["accuracy"])]] + [[t, "", _fmt(v)] for t, v in sorted(m["by_type"].items())]
        out.append(("VQA", ["question type", "questions", "accuracy"], rows,
                    "Greedy answers; exact match after VQA answer normalisation."))
    if "text" in metrics:
        m = metrics["text"]
        out.append(("Text", ["held-out documents", "text tokens", "cross-entropy (nats)", "perplexity"],
                    [[str(m["documents"]), str(m["tokens"]), _fmt(m["text_ce"], 4), _fmt(m["perplexity"], 3)]],
                    "Captions before their images, VQA answers after theirs; images clean."))
    checks = metrics.get("cross_checks", {})
    rows = []
    cap = checks.get("captioning", {})
    if "cider" in cap:
        rows.append(["CIDEr-D", cap["reference"], _fmt(cap["cider"], 6), f"{cap['cider_abs_diff']:.2e}"])
        rows.append(["BLEU-4", cap["reference"], _fmt(cap["bleu4"], 6), f"{cap['bleu4_abs_diff']:.2e}"])
    elif cap:
        rows.append(["CIDEr-D / BLEU-4", cap.get("status", ""), "", ""])
    f = checks.get("fid", {})
    if "fid" in f:
        rows.append(["FID", f["reference"], _fmt(f["fid"], 4), f"{f['abs_diff']:.2e}"])
    elif f:
        rows.append(["FID", f.get("status", ""), "", ""])
    if rows:
        out.append(("Cross-checks against reference implementations", ["metric", "reference", "its value", "|ours - its|"],
                    rows, "The same inputs through an independent implementation."))
    return out


def _figure_keys(paths: dict) -> list[str]:
    keys = ["geneval", *[k for k in paths if k.startswith("geneval-")], "attributes",
            *[k for k in paths if k.startswith("samples-")]]
    return [k for k in keys if k in paths]


def _markdown(metrics: dict, paths: dict, out: Path) -> str:
    lines = [f"# mixmodal eval: `{metrics['checkpoint']}`", "",
             f"Suite `{metrics['suite']}` at {metrics['resolution']} px, {metrics['config']['min_objects']}-"
             f"{metrics['config']['max_objects']} objects; {metrics['seconds']} s. All numbers: `metrics.json`.", "",
             f"Reproduce (numbers and figures): `{metrics.get('command', '')}`", ""]
    for title, header, rows, note in _sections(metrics):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines += ["", note, ""]
    for key in _figure_keys(paths):
        lines += [f"![{key}]({_rel(paths[key], out)})", ""]
    return "\n".join(lines)


def _html(metrics: dict, paths: dict, out: Path, artifacts: dict, caption_files: list) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mixmodal eval</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}.note{color:#555;font-size:13px}"
             ".cap{display:inline-block;width:250px;vertical-align:top;margin:4px;font-size:12px}"
             ".cap img{width:96px;image-rendering:pixelated}</style></head><body>",
             f"<h1>mixmodal eval</h1><p><code>{e(metrics['checkpoint'])}</code> &mdash; suite {e(metrics['suite'])}, "
             f"{metrics['resolution']} px, {metrics['seconds']} s. <a href='metrics.json'>metrics.json</a></p>"
             f"<p class='note'>Reproduce: <code>{e(metrics.get('command', ''))}</code></p>"]
    for title, header, rows, note in _sections(metrics):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append(f"</table><p class='note'>{e(note)}</p>")
    for key in _figure_keys(paths):
        parts.append(f"<h3>{e(key)}</h3><img src='{e(_rel(paths[key], out))}' style='max-width:100%'>")
    examples = artifacts.get("captioning", [])
    if examples:
        parts.append("<h2>Captions</h2>")
        for ex, f in zip(examples, caption_files):
            refs = "<br>".join(e(r) for r in ex["references"][:2])
            parts.append(f"<div class='cap'><img src='{e(_rel(f, out))}'><br><b>{e(ex['caption'])}</b>"
                         f"<br><span class='note'>refs: {refs}</span></div>")
    vqa = artifacts.get("vqa", [])
    if vqa:
        parts.append("<h2>VQA (first 20)</h2><table><tr><th>question</th><th>answer</th><th>model</th></tr>")
        for ex in vqa[:20]:
            parts.append(f"<tr><td>{e(ex['question'])}</td><td>{e(ex['answer'])}</td><td>{e(ex['prediction'])}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = ["attribute_figure", "describe_sampling", "geneval_figure", "geneval_grid", "headline", "sample_grid",
           "write_report"]
