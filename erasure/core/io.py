"""Atomic file writes and training checkpoints.

Every output is written to a temporary name in the same folder and renamed into place, so
an interrupted job leaves either the old file or the new one, never half of one.
Checkpoints hold safetensors for weights and ``weights_only`` torch files for optimizer
state, so nothing here ever unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from erasure.core.errors import ErasureError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with a clear error when it is corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ErasureError(f"'{path}' is not valid JSON ({e}); delete it and rerun.") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors to safetensors atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ErasureError(f"'{path}' does not exist.")
    try:
        device = torch.device(device)
        # safetensors accepts "cpu" but not "cpu:0", which accelerate reports in multi-process CPU runs.
        return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ErasureError(f"'{path}' is not a readable safetensors file ({e}); it may be corrupt.") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ErasureError(f"'{path}' is not a readable safetensors file ({e}); it may be corrupt.") from None


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], extra: dict[str, Any]) -> None:
    """Write ``folder`` = {name}.safetensors for each state dict, optimizer.pt, state.json.

    ``tensors`` maps a file stem (``model``, ``ema``) to a flat state dict; ``extra`` holds
    the optimizer state dict (``optimizer``) and anything JSON-able. The folder is built
    beside the old one and swapped in, so a crash mid-save keeps the previous checkpoint.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for stem, state in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{stem}.safetensors"))
    extra = dict(extra)
    if "optimizer" in extra:
        torch.save(extra.pop("optimizer"), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The latest checkpoint in ``folder`` (or its ``.old`` twin after a crash mid-save), or None."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if not (candidate / "state.json").is_file():
            continue
        state = read_json(candidate / "state.json")
        for file in candidate.glob("*.safetensors"):
            state[file.stem] = load_tensors(file)
        if (candidate / "optimizer.pt").is_file():
            state["optimizer"] = torch.load(candidate / "optimizer.pt", map_location="cpu", weights_only=True)
        return state
    return None
