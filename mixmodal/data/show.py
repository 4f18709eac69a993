"""Contact sheets: a grid of documents, each shown as its images with its text below."""

from __future__ import annotations

import textwrap
from typing import Iterable

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from mixmodal.documents import Document, Image, Text

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FRAME = (200, 200, 200)


def contact_sheet(
    docs: Iterable[Document],
    columns: int = 4,
    thumb: int = 96,
    max_images_per_doc: int = 4,
    text_lines: int = 6,
    font_size: int = 11,
) -> PIL.Image.Image:
    """Lay documents out in a grid; each cell shows up to `max_images_per_doc` thumbnails
    (thumb x thumb, aspect kept) in a row and the document's text wrapped underneath."""
    docs = list(docs)
    if not docs:
        raise ValueError("contact_sheet: no documents to show (is the source empty, or were all records skipped?)")
    if columns < 1 or thumb < 8:
        raise ValueError(f"contact_sheet: columns must be >= 1 and thumb >= 8, got {columns}, {thumb}")
    font = PIL.ImageFont.load_default(size=font_size)
    pad = 6
    line_height = font_size + 3
    cell_w = max_images_per_doc * (thumb + pad) + pad
    chars_per_line = max(10, int(cell_w / (font_size * 0.55)))
    cell_h = thumb + 2 * pad + text_lines * line_height + pad
    rows = (len(docs) + columns - 1) // columns
    sheet = PIL.Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    draw = PIL.ImageDraw.Draw(sheet)
    for n, doc in enumerate(docs):
        x0, y0 = (n % columns) * cell_w, (n // columns) * cell_h
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], outline=FRAME)
        images = [p.image for p in doc.parts if isinstance(p, Image)][:max_images_per_doc]
        for k, img in enumerate(images):
            t = img.copy()
            t.thumbnail((thumb, thumb), PIL.Image.Resampling.NEAREST if max(img.size) <= thumb else PIL.Image.Resampling.LANCZOS)
            if max(t.size) < thumb:  # small images (32 px worlds) are shown enlarged, pixel-exact
                scale = thumb // max(t.size)
                t = t.resize((t.size[0] * scale, t.size[1] * scale), PIL.Image.Resampling.NEAREST)
            sheet.paste(t, (x0 + pad + k * (thumb + pad), y0 + pad))
        text = _describe(doc)
        lines = textwrap.wrap(text, chars_per_line)[:text_lines]
        for i, line in enumerate(lines):
            draw.text((x0 + pad, y0 + thumb + 2 * pad + i * line_height), line, fill=INK, font=font)
    return sheet


def _describe(doc: Document) -> str:
    """The document's text in reading order, images marked as [img k]."""
    out, k = [], 0
    for part in doc.parts:
        if isinstance(part, Text):
            out.append(" ".join(part.text.split()))
        else:
            k += 1
            out.append(f"[img {k}]")
    head = f"{doc.id}: " if doc.id else ""
    return head + " ".join(out)
