"""Compact deltas: only what an erasure changed, applied exactly onto the base weights.

A delta holds, for every tensor that changed, either the whole new tensor or, when fewer
than half of its entries changed, a bit-packed map of the changed entries and their new
values (a SalUn mask of ratio 0.5 changes about half; ESD-x changes only ``attn2``).
It stores new values, not differences, so applying it is bit-exact; a checksum of the
base weights guards against applying it onto the wrong model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from erasure.core.errors import ErasureError
from erasure.core.io import json_metadata, load_tensors, read_metadata, save_tensors
from erasure.core.saliency import pack_bits, unpack_bits

FORMAT = "erasure-delta/1"


def checksum(state: dict[str, torch.Tensor]) -> str:
    """A hash of a state dict's names, dtypes and values."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def make_delta(base: dict[str, torch.Tensor], new: dict[str, torch.Tensor], path: str | Path, **info: Any) -> dict[str, int]:
    """Write the changes from ``base`` to ``new`` to ``path``; returns counts of what was stored."""
    if base.keys() != new.keys():
        raise ErasureError("the two models have different tensors; a delta needs the same architecture.")
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list[int]] = {}
    changed_entries = 0
    for name, b in base.items():
        n = new[name].detach().cpu()
        b = b.detach().cpu()
        if n.dtype != b.dtype or n.shape != b.shape:
            raise ErasureError(f"'{name}' differs in dtype or shape between the models; a delta needs the same architecture and dtype.")
        changed = n != b
        count = int(changed.sum())
        if count == 0:
            continue
        changed_entries += count
        if 2 * count < n.numel():
            tensors[f"{name}::changed"] = pack_bits(changed)
            tensors[f"{name}::values"] = n[changed].contiguous()
            layout[name] = list(n.shape)
        else:
            tensors[name] = n.contiguous()
    metadata = {"format": FORMAT, "base_checksum": checksum(base), "sparse": json.dumps(layout), "info": json.dumps(info)}
    save_tensors(path, tensors, metadata)
    return {"tensors": len({k.split("::")[0] for k in tensors}), "entries": changed_entries}


def _metadata(path: str | Path) -> dict[str, str]:
    """The metadata of the delta at ``path``; a clear error for a file that is not one."""
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise ErasureError(f"'{path}' is not an erasure delta (format {metadata.get('format')!r}, expected {FORMAT!r}).")
    return metadata


def delta_record(path: str | Path) -> dict[str, Any]:
    """What the delta at ``path`` records about its making (method, concept, base model, ...)."""
    metadata = _metadata(path)
    return json_metadata(metadata, "info", path, dict) if "info" in metadata else {}


def apply_delta(state: dict[str, torch.Tensor], path: str | Path, check: bool = True) -> dict[str, torch.Tensor]:
    """Return ``state`` with the delta at ``path`` applied (a new dict; ``state`` is untouched)."""
    metadata = _metadata(path)
    if "base_checksum" not in metadata:
        raise ErasureError(f"the delta '{path}' has no 'base_checksum' in its metadata; it is damaged. Export it again.")
    layout = json_metadata(metadata, "sparse", path, dict)
    if check and checksum(state) != metadata["base_checksum"]:
        raise ErasureError(
            f"'{path}' was made against different base weights (checksum {metadata['base_checksum']}, "
            f"this model {checksum(state)}). Load the base model the delta was made from, in full precision."
        )
    tensors = load_tensors(path)
    check_delta(tensors, layout, state, path)
    out = dict(state)
    for key, value in tensors.items():
        name, _, part = key.partition("::")
        if part == "":
            out[name] = value.to(out[name].device)
        elif part == "changed":
            changed = unpack_bits(value, layout[name]).to(out[name].device)
            merged = out[name].detach().clone()
            merged[changed] = tensors[f"{name}::values"].to(merged.device)
            out[name] = merged
    return out


def check_delta(tensors: dict[str, torch.Tensor], layout: dict[str, Any], state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise a clear error unless every tensor of the delta fits ``state`` and its sparse layout.

    Checked before anything is applied: a whole tensor must match the model's shape; a
    sparse one needs its layout entry (the model's shape), exactly ceil(numel / 8) packed
    bytes and one value per changed entry.
    """

    def bad(message: str) -> ErasureError:
        return ErasureError(f"'{path}' {message}; the delta is damaged or was made for another model. Export it again.")

    names = {k.partition("::")[0] for k in tensors}
    for name in sorted(names):
        if name not in state:
            raise ErasureError(f"'{path}' changes '{name}', which this model does not have; it was made for another architecture.")
        target = state[name]
        if name in tensors:
            if tuple(tensors[name].shape) != tuple(target.shape):
                raise bad(f"holds '{name}' in shape {list(tensors[name].shape)}, but the model's is {list(target.shape)}")
            continue
        changed, values = tensors.get(f"{name}::changed"), tensors.get(f"{name}::values")
        if changed is None or values is None:
            raise bad(f"holds only one of '{name}::changed' and '{name}::values'")
        if layout.get(name) != list(target.shape):
            raise bad(f"lists '{name}' with shape {layout.get(name)!r} in its 'sparse' metadata, but the model's is {list(target.shape)}")
        if changed.dtype != torch.uint8 or changed.dim() != 1 or changed.numel() != (target.numel() + 7) // 8:
            raise bad(f"holds {changed.numel()} packed bytes for '{name}', which needs {(target.numel() + 7) // 8}")
        count = int(unpack_bits(changed, list(target.shape)).sum())
        if values.dim() != 1 or values.numel() != count:
            raise bad(f"marks {count} changed entries of '{name}' but holds {values.numel()} values")
    unknown = [k for k in tensors if k.partition("::")[2] not in ("", "changed", "values")]
    if unknown:
        raise bad(f"holds a tensor named '{unknown[0]}', which is not part of the delta format")
