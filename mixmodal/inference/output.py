"""Save generated documents for people to look at.

`save_generation(results, out_dir)` writes:

    out_dir/
      documents.jsonl     one record per generated document, in the schema of
                          mixmodal.documents (read it back with record_to_document);
                          with prompts, metadata["prompt"] holds the prompt record,
                          its images inlined as base64
      images/0000_0.png   image k of document i as images/{i:04d}_{k}.png, referenced
                          from the JSONL relative to out_dir
      index.html          one self-contained page (images as data: URIs, inline CSS,
                          no JavaScript): the settings, then a card per document with
                          its prompt, the generated parts in reading order, and its metadata

documents.jsonl and index.html are written atomically; writing into an existing
out_dir overwrites them and same-named images.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mixmodal.documents import Document, Image, document_to_record

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
.doc { border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin: 1.5em 0; }
.prompt { background: #f4f4f8; padding: 0.5em 1em; border-radius: 4px; }
.text { white-space: pre-wrap; }
figure { display: inline-block; margin: 0.5em; text-align: center; vertical-align: top; }
img { image-rendering: pixelated; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.8em; color: #666; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
.empty { font-style: italic; }
"""


@dataclass
class GenerationFiles:
    out_dir: Path
    jsonl: Path
    images: list[Path]
    html: Path


def save_generation(
    results: Sequence[Document],
    out_dir: str | os.PathLike,
    *,
    prompts: Sequence[Document] | None = None,
    settings: dict | None = None,
    title: str = "mixmodal generate",
) -> GenerationFiles:
    """Write `results` (and their `prompts`, one per result) under `out_dir`; see the module doc."""
    _check_prompts(results, prompts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output directory {out} exists and is a file; pick a directory to save into")
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines, images = [], []
    for i, doc in enumerate(results):
        record = document_to_record(doc, image_dir, out, f"{i:04d}", "png")
        images += [out / p["path"] for p in record["parts"] if p["type"] == "image"]
        if prompts is not None:
            prompt_record = document_to_record(prompts[i], None, out, "prompt", "png")
            record["metadata"] = {**record.get("metadata", {}), "prompt": prompt_record}
        lines.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    jsonl = _write_atomic(out / "documents.jsonl", "".join(lines))
    page = render_html(results, prompts=prompts, settings=settings, title=title)
    return GenerationFiles(out, jsonl, images, _write_atomic(out / "index.html", page))


def render_html(
    results: Sequence[Document],
    *,
    prompts: Sequence[Document] | None = None,
    settings: dict | None = None,
    title: str = "mixmodal generate",
) -> str:
    """One self-contained HTML page showing the settings and each (prompt, result) pair."""
    _check_prompts(results, prompts)
    esc = html.escape
    out = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>',
        f"<style>{_CSS}</style></head><body>\n<h1>{esc(title)}</h1>",
    ]
    if settings:
        out.append(f"<h2>Settings</h2>{_table(settings)}")
    if not results:
        out.append('<p class="empty">No documents were generated.</p>')
    for i, doc in enumerate(results):
        name = f"Document {i}" + (f" ({doc.id})" if doc.id is not None else "")
        out.append(f'<section class="doc"><h2>{esc(name)}</h2>')
        if prompts is not None:
            out.append(f'<div class="prompt"><h3>Prompt</h3>{_parts(prompts[i], 96, "prompt image")}</div>')
        out.append(f"<h3>Generated</h3>{_parts(doc, 192, 'image')}")
        meta = {k: v for k, v in doc.metadata.items() if k != "prompt"}
        if meta:
            out.append(_table(meta))
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _check_prompts(results: Sequence[Document], prompts: Sequence[Document] | None) -> None:
    if prompts is not None and len(prompts) != len(results):
        raise ValueError(f"got {len(prompts)} prompts for {len(results)} results; give one prompt per result")


def _parts(doc: Document, width: int, label: str) -> str:
    """The parts in reading order: text runs as paragraphs, images as captioned figures."""
    out, k = [], 0
    for part in doc.parts:
        if isinstance(part, Image):
            w, h = part.size
            shown = w * -(-width // w) if w < width else min(w, 512)  # whole-number upscale
            out.append(
                f'<figure><img src="{_data_uri(part)}" width="{shown}" alt="{label} {k}">'
                f"<figcaption>{label} {k} ({w}x{h})</figcaption></figure>"
            )
            k += 1
        else:
            out.append(f'<p class="text">{html.escape(part.text)}</p>')
    return "\n".join(out) or '<p class="empty">(empty)</p>'


def _data_uri(part: Image) -> str:
    buf = io.BytesIO()
    part.image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _table(values: dict) -> str:
    def show(v: object) -> str:
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)

    esc = html.escape
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(show(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
