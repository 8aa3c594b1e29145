"""Labeled comparison grids: one row per class, one column per model, same seeds in each row."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from erasure.core.io import atomic_path


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


def font(size: int = 13) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` (a bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def labelled_grid(cells: dict[str, list[list[Path]]], row_labels: list[str], path: str | Path, note: str = "", thumb: int = 128) -> None:
    """Save a PNG grid of image files: ``cells[column][row]`` is a list of files shown side by side.

    Columns are models, rows prompts (their text wrapped on the left); every image is resized
    to ``thumb`` pixels so 512 px generations stay a readable size.
    """
    import textwrap

    small, pad, label_w = font(12), 8, 220
    per_cell = max(len(files) for column in cells.values() for files in column)
    cell_w = per_cell * thumb + (per_cell - 1) * 2
    header_h = 46 if note else 26
    width = label_w + len(cells) * (cell_w + pad)
    height = header_h + len(row_labels) * (thumb + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if note:
        draw.text((4, 4), note, fill="black", font=small)
    for j, name in enumerate(cells):
        draw.text((label_w + j * (cell_w + pad) + 2, header_h - 20), name, fill="black", font=font(14))
    for i, label in enumerate(row_labels):
        y = header_h + i * (thumb + pad)
        lines = textwrap.wrap(label, 32)[: max(1, thumb // 15)]
        draw.multiline_text((4, y + 2), "\n".join(lines), fill="black", font=small, spacing=2)
        for j, column in enumerate(cells.values()):
            for k, file in enumerate(column[i]):
                with Image.open(file) as img:
                    tile = img.convert("RGB").resize((thumb, thumb), Image.LANCZOS if img.width > thumb else Image.NEAREST)
                canvas.paste(tile, (label_w + j * (cell_w + pad) + k * (thumb + 2), y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
