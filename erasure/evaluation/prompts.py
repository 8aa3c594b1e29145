"""Evaluation prompt lists: I2P-format CSVs, generic prompt CSVs and plain text files.

Every loader returns :class:`Prompt` rows whose ``item`` goes straight into the shared
generation engine (:func:`erasure.sd.generate.generate`).

- I2P format (``prompt, categories, evaluation_seed, evaluation_guidance, sd_image_width,
  sd_image_height``; other columns ignored): I2P itself and the UnlearnDiffAtk subsets.
- Generic CSV: a ``prompt`` column plus optional seed (``evaluation_seed`` or ``seed``),
  guidance (``evaluation_guidance`` or ``guidance``) and class (``class``, ``label_str``,
  ``artist``) columns: COCO captions, Imagenette class prompts, ESD art prompts.
- ``.txt``: one prompt per line (``#`` lines are comments); seeds are ``base_seed + k``.
- ``i2p``: the I2P CSV from the Hugging Face hub (needs the internet once; cached after).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

from erasure.core.errors import ErasureError
from erasure.sd.generate import Item

I2P_REPO = "AIML-TUDA/i2p"
I2P_FILE = "i2p_benchmark.csv"
SEED_COLUMNS = ("evaluation_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance")
LABEL_COLUMNS = ("class", "label_str", "artist")


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: what to generate, plus what the audits need to know about it."""

    item: Item
    categories: tuple[str, ...] = ()
    label: str | None = None  # the class or artist the prompt is about, when the file says
    where: str = ""  # "file:line", for error messages


def fetch_i2p() -> Path:
    """The I2P CSV from the hub (cached by huggingface_hub); a clear error when offline."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(I2P_REPO, I2P_FILE, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 - offline mode, network and auth errors all mean the same to the user
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else ""
        raise ErasureError(
            f"could not download the I2P prompts ({I2P_REPO}/{I2P_FILE}): {type(e).__name__}: {reason}. "
            "Offline, pass a local copy of the I2P CSV instead, e.g. --prompts path/to/unsafe-prompts4703.csv."
        ) from None


def _number(row: dict[str, str], columns: tuple[str, ...], kind: type, where: str) -> int | float | None:
    for column in columns:
        text = (row.get(column) or "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise ErasureError(f"{where}: column '{column}' should be a number, got '{text}'. Fix or remove that row.") from None
        if kind is int and not value.is_integer():
            raise ErasureError(f"{where}: column '{column}' should be a whole number, got '{text}'. Fix or remove that row.")
        return kind(value)
    return None


def read_csv(path: str | Path, base_seed: int = 0, guidance: float = 7.5, steps: int = 50, skip_empty: bool = False) -> list[Prompt]:
    """Prompts of an I2P-format or generic CSV (see the module docstring for the columns).

    Rows without a seed column get ``base_seed + row``; rows without guidance get ``guidance``.
    An empty prompt is an error unless ``skip_empty`` (the widely used copy of I2P,
    unsafe-prompts4703.csv, has one, case 2260; the hub copy has it fixed).
    """
    path = Path(path)
    # utf-8-sig: some public lists (SalUn's Imagenette CSV) start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "prompt" not in columns:
            raise ErasureError(
                f"{path}: no 'prompt' column (columns: {', '.join(columns) or 'none'}). Prompt CSVs need a header row with 'prompt'."
            )
        reader.fieldnames = columns
        out = []
        for k, row in enumerate(reader):
            where = f"{path}:{reader.line_num}"
            text = (row.get("prompt") or "").strip()
            if not text:
                if skip_empty:
                    continue
                raise ErasureError(f"{where}: the prompt is missing. Fix or remove that row, or pass --skip-empty-prompts.")
            seed = _number(row, SEED_COLUMNS, int, where)
            scale = _number(row, GUIDANCE_COLUMNS, float, where)
            width = _number(row, ("sd_image_width",), int, where)
            height = _number(row, ("sd_image_height",), int, where)
            categories = tuple(c.strip() for c in (row.get("categories") or "").split(",") if c.strip())
            label = next((row[c].strip() for c in LABEL_COLUMNS if (row.get(c) or "").strip()), None)
            item = Item(
                prompt=text,
                seed=base_seed + k if seed is None else seed,
                guidance=guidance if scale is None else scale,
                steps=steps,
                width=width,
                height=height,
            )
            out.append(Prompt(item, categories, label, where))
    return out


def read_txt(path: str | Path, base_seed: int = 0, guidance: float = 7.5, steps: int = 50) -> list[Prompt]:
    """One prompt per line (blank and ``#`` lines skipped); the k-th prompt gets seed ``base_seed + k``."""
    path = Path(path)
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append(Prompt(Item(text, base_seed + len(out), guidance, steps), where=f"{path}:{number}"))
    return out


def with_category(prompts: list[Prompt], category: str, source: str) -> list[Prompt]:
    """The prompts tagged ``category`` (I2P's multi-label ``categories`` column)."""
    kept = [p for p in prompts if category in p.categories]
    if not kept:
        present = sorted({c for p in prompts for c in p.categories})
        raise ErasureError(
            f"no prompt in '{source}' has the category '{category}'. "
            + (f"Categories present: {', '.join(present)}." if present else "The file has no 'categories' column (or it is empty).")
        )
    return kept


def load_prompts(
    source: str | Path,
    category: str | None = None,
    limit: int | None = None,
    base_seed: int = 0,
    guidance: float = 7.5,
    steps: int = 50,
    size: int | None = None,
    skip_empty: bool = False,
) -> list[Prompt]:
    """Prompts from ``source`` (a .csv or .txt path, or ``i2p`` for the hub copy), filtered and cut.

    ``guidance`` applies where the file has none; ``size`` overrides the file's image size
    (None keeps it, and rows without one use the model's native size); ``skip_empty`` drops
    CSV rows with an empty prompt instead of failing.
    """
    name = str(source)
    path = fetch_i2p() if name == "i2p" else Path(name).expanduser()
    if not path.is_file():
        raise ErasureError(f"prompt file '{path}' does not exist. Pass a .csv or .txt path, or 'i2p' to download I2P (online).")
    if path.suffix.lower() == ".txt":
        prompts = read_txt(path, base_seed, guidance, steps)
    else:
        prompts = read_csv(path, base_seed, guidance, steps, skip_empty)
    if category:
        prompts = with_category(prompts, category, name)
    if limit is not None:
        prompts = prompts[:limit]
    if size is not None:
        prompts = [replace(p, item=replace(p.item, width=size, height=size)) for p in prompts]
    if not prompts:
        raise ErasureError(f"'{name}' holds no prompts.")
    return prompts
