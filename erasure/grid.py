"""Labeled comparison grids: one row per class, one column per model, same seeds in each row."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from erasure.io import atomic_path


def _tile(images: torch.Tensor, scale: int) -> Image.Image:
    """A horizontal strip of uint8 images (n, C, H, W), each enlarged ``scale`` times."""
    n, c, h, w = images.shape
    strip = images.permute(2, 0, 3, 1).reshape(h, n * w, c)  # H, n*W, C
    img = Image.fromarray(strip.squeeze(-1).numpy() if c == 1 else strip.numpy())
    return img.resize((n * w * scale, h * scale), Image.NEAREST).convert("RGB")


def comparison_grid(columns: dict[str, torch.Tensor], row_names: list[str], path: str | Path, pad: int = 6) -> None:
    """Save a PNG grid. ``columns[name]`` is uint8 (rows, n, C, H, W): n samples per row."""
    first = next(iter(columns.values()))
    scale = max(1, 48 // first.shape[-1])
    font = ImageFont.load_default()
    cells = {name: [_tile(imgs[r], scale) for r in range(len(row_names))] for name, imgs in columns.items()}
    cell_w, cell_h = next(iter(cells.values()))[0].size
    label_w, header_h = 90, 22
    width = label_w + len(columns) * (cell_w + pad)
    height = header_h + len(row_names) * (cell_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((label_w + j * (cell_w + pad) + 2, 4), name, fill="black", font=font)
    for i, row in enumerate(row_names):
        y = header_h + i * (cell_h + pad)
        draw.text((4, y + cell_h // 2 - 6), row, fill="black", font=font)
        for j, name in enumerate(columns):
            canvas.paste(cells[name][i], (label_w + j * (cell_w + pad), y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
