"""Saliency masks: which weights an erasure may touch (SalUn).

A mask is built in three steps:
1. :func:`accumulate_gradients` sums the *signed* gradient of a forgetting loss over a
   pass of the forget data (each batch's gradient clipped first where the caller asks:
   the DDPM reference clips to norm 1, its SD and classifier code do not).
2. :func:`threshold` keeps the top ``ratio`` of weights by ``|sum|``, globally across all
   tensors by default or per tensor. It runs on the tensors' device with ``kthvalue``,
   and breaks ties by position so the kept count is exact.
3. :class:`Mask` saves the result bit-packed in safetensors (1 bit per weight) with its
   ratio, loss and a fingerprint of the model, and checks that fingerprint on load.

:class:`MaskConstraint` makes the mask a hard constraint during training: masked-out
weights stay bit-identical whatever the optimizer does (weight decay and momentum move
weights whose gradient is zero, so zeroing gradients alone is not enough).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from erasure.core.errors import ErasureError
from erasure.core.io import json_metadata, load_tensors, read_metadata, save_tensors

FORMAT = "erasure-mask/1"


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's parameter names and shapes (not values)."""
    text = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def accumulate_gradients(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    clip_norm: float | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum over ``batches`` of the gradient of ``loss_fn(model, batch)``, per parameter (fp32).

    With ``clip_norm``, each batch's gradient is first clipped to that total norm.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for batch in tqdm(batches, desc="saliency", disable=not progress, leave=False):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)
        for n, p in params.items():
            if p.grad is not None:
                total[n] += p.grad.float()
    model.zero_grad(set_to_none=True)
    return total


def top_fraction(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ``round(ratio * n)`` largest entries of a 1-d tensor.

    Ties at the threshold are broken by position (lower index first), so the result is
    exactly what a stable descending sort would pick.
    """
    n = scores.numel()
    k = int(round(ratio * n))
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():
        raise ErasureError("the saliency scores contain NaN; the forgetting loss diverged (lower the learning rate or check the data).")
    kth_largest = torch.kthvalue(scores, n - k + 1).values
    keep = scores > kth_largest
    missing = k - int(keep.sum())
    ties = torch.nonzero(scores == kth_largest).flatten()[:missing]
    keep[ties] = True
    return keep


def threshold(scores: dict[str, torch.Tensor], ratio: float = 0.5, per_layer: bool = False) -> dict[str, torch.Tensor]:
    """Keep the top ``ratio`` of entries by score, globally or within each tensor."""
    if per_layer:
        return {n: top_fraction(s.flatten(), ratio).view(s.shape) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = top_fraction(flat, ratio)
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return out


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte (most significant bit first)."""
    flat = bits.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The inverse of :func:`pack_bits`, reshaped to ``shape``."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1
    numel = 1
    for d in shape:
        numel *= d
    return bits.flatten()[:numel].view(shape).bool()


def check_packed(packed: dict[str, torch.Tensor], shapes: dict[str, Any], path: str | Path) -> None:
    """Raise a clear error unless every entry of ``shapes`` has a 1-d uint8 tensor of exactly ceil(numel / 8) bytes.

    Names with no shape, shapes with no tensor and short tensors all mean a damaged or
    hand-edited file; reading it anyway would fail in a reshape or silently misalign bits.
    """
    missing = [n for n in shapes if n not in packed]
    extra = [n for n in packed if n not in shapes]
    if missing or extra:
        parts = [f"{len(missing)} listed tensors missing (e.g. '{missing[0]}')"] if missing else []
        parts += [f"{len(extra)} tensors not listed in its shapes (e.g. '{extra[0]}')"] if extra else []
        raise ErasureError(f"'{path}' is inconsistent: {'; '.join(parts)}. The file is damaged; make it again.")
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ErasureError(f"'{path}': the shape of '{name}' is {shape!r}, not a list of sizes; the file is damaged.")
        numel = 1
        for d in shape:
            numel *= d
        t = packed[name]
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != (numel + 7) // 8:
            raise ErasureError(
                f"'{path}': '{name}' holds {t.numel()} {str(t.dtype).removeprefix('torch.')} values in shape {list(t.shape)}, but "
                f"its shape {shape} needs {(numel + 7) // 8} packed bytes (uint8, 1-d). The file is damaged; make it again."
            )


@dataclass
class Mask:
    """Per-parameter boolean masks (True = may be trained) with their provenance."""

    tensors: dict[str, torch.Tensor]
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)  # ratio, loss, per_layer, ...

    @classmethod
    def from_scores(
        cls, model: torch.nn.Module, scores: dict[str, torch.Tensor], ratio: float, per_layer: bool = False, **info: Any
    ) -> Mask:
        """Threshold saliency scores (e.g. ``|accumulated gradient|``) of ``model`` into a mask."""
        return cls(threshold(scores, ratio, per_layer), model_fingerprint(model), {"ratio": ratio, "per_layer": per_layer, **info})

    @classmethod
    def random(cls, model: torch.nn.Module, ratio: float, seed: int = 0, per_layer: bool = False) -> Mask:
        """A uniformly random mask at the same ratio: the ablation that shows saliency matters."""
        g = torch.Generator().manual_seed(seed)
        scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
        return cls.from_scores(model, scores, ratio, per_layer, loss="random", seed=seed)

    @property
    def kept_fraction(self) -> float:
        """Fraction of all weights the mask lets change."""
        kept = sum(int(t.sum()) for t in self.tensors.values())
        return kept / max(1, sum(t.numel() for t in self.tensors.values()))

    def save(self, path: str | Path) -> None:
        """Bit-packed safetensors; shapes, ratio, loss and fingerprint go in the metadata."""
        shapes = {n: list(t.shape) for n, t in self.tensors.items()}
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint, "shapes": json.dumps(shapes), "info": json.dumps(self.info)}
        save_tensors(path, {n: pack_bits(t) for n, t in self.tensors.items()}, metadata)

    @classmethod
    def load(cls, path: str | Path, model: torch.nn.Module | None = None, device: str | torch.device = "cpu") -> Mask:
        """Load a mask; with ``model`` given, check that it was made for that model."""
        packed = load_tensors(path, device)
        metadata = read_metadata(path)
        if metadata.get("format") != FORMAT:
            raise ErasureError(f"'{path}' is not an erasure mask (format {metadata.get('format')!r}, expected {FORMAT!r}).")
        shapes = json_metadata(metadata, "shapes", path, dict)
        info = json_metadata(metadata, "info", path, dict)
        if "fingerprint" not in metadata:
            raise ErasureError(f"the mask '{path}' has no 'fingerprint' in its metadata; it is damaged. Compute it again (`erasure mask`).")
        check_packed(packed, shapes, path)
        mask = cls({n: unpack_bits(packed[n], shapes[n]) for n in shapes}, metadata["fingerprint"], info)
        if model is not None:
            mask.check(model, source=str(path))
        return mask

    def check(self, model: torch.nn.Module, source: str = "the mask") -> None:
        """Raise a clear error unless the mask has exactly the model's parameter names and shapes."""
        params = dict(model.named_parameters())
        missing = [n for n in params if n not in self.tensors]
        extra = [n for n in self.tensors if n not in params]
        wrong = [n for n in params if n in self.tensors and tuple(self.tensors[n].shape) != tuple(params[n].shape)]
        if missing or extra or wrong:
            details = []
            if wrong:
                n = wrong[0]
                details.append(
                    f"{len(wrong)} shape mismatches (e.g. '{n}': mask {list(self.tensors[n].shape)} vs model {list(params[n].shape)})"
                )
            if missing:
                details.append(f"{len(missing)} model parameters not in the mask (e.g. '{missing[0]}')")
            if extra:
                details.append(f"{len(extra)} mask entries not in the model (e.g. '{extra[0]}')")
            raise ErasureError(
                f"{source} does not fit this model: {'; '.join(details)}. "
                "It was made for a different architecture; compute a new mask for this model (`erasure mask`)."
            )


class MaskConstraint:
    """Keeps masked-out weights bit-identical during training.

    Gradients of masked-out entries are zeroed by hooks (so clipping and optimizer state
    see only trainable entries), and :meth:`enforce`, called after every optimizer step,
    copies the original values back, undoing weight decay, momentum or anything else.
    With ``hold=False`` only the gradients are masked: weight decay (and the momentum it
    feeds) still moves masked-out weights, as in earlier versions of the reference's
    classification code (``unlearn.salun.mask_mode: gradient``).
    """

    def __init__(self, model: torch.nn.Module, mask: Mask, hold: bool = True) -> None:
        mask.check(model)
        self.hold = hold
        # Only the masked-out values are kept (not a copy of the whole model): for the SD
        # UNet at ratio 0.5 that is 1.7 GB instead of 3.4 GB of GPU memory.
        self.entries: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self.hooks = []
        for name, p in model.named_parameters():
            frozen = ~mask.tensors[name].to(p.device)
            if not bool(frozen.any()) or not p.requires_grad:  # frozen weights cannot move anyway
                continue
            self.entries.append((p, frozen, p.detach()[frozen].clone()))
            self.hooks.append(p.register_hook(lambda grad, frozen=frozen: grad.masked_fill(frozen, 0)))

    @torch.no_grad()
    def enforce(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore every masked-out entry to its original value; with ``optimizer``, zero its state there too.

        SGD's weight decay enters the momentum buffer even where the gradient is zero, so
        without the reset masked-out entries would carry a growing buffer (harmless to the
        weights, which are restored, but it is not the reference's state and it would move
        them if the mask were ever lifted). Every state tensor shaped like the weight
        (momentum, Adam's moments) is zeroed at the masked-out entries. Where ``optimizer``
        provably leaves them alone (no weight decay), nothing needs restoring and the pass is
        skipped: for the SD UNet it reads and writes the whole model and its optimizer state.
        """
        if not self.hold or (optimizer is not None and _leaves_zero_gradients_alone(optimizer)):
            return
        for p, frozen, original in self.entries:
            p.masked_scatter_(frozen, original)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.masked_fill_(frozen, 0)

    def remove(self) -> None:
        """Detach the gradient hooks."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


def _leaves_zero_gradients_alone(optimizer: torch.optim.Optimizer) -> bool:
    """Whether entries whose gradient is always zero stay bit-identical under ``optimizer`` by themselves.

    True for Adam, AdamW and SGD without weight decay: their state there stays exactly zero
    (moments and momentum are sums of zero gradients), so each update there is exactly zero.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    known = type(inner) in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
    return known and all(group.get("weight_decay", 0) == 0 for group in inner.param_groups)
