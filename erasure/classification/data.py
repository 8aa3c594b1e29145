"""Splits, forget sets and the device-resident input pipeline for classification unlearning.

The dataset's train split is cut (seeded) into train and validation; the forget set is a
seeded random share of train, or one whole class. Every index set is saved with the run
(``split.safetensors``), so a table can always be traced back to the exact images.

Images stay uint8 on the device for the whole run; batches are drawn by index, then
cropped, flipped and scaled there, so the GPU never waits for a data loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from erasure.classification.config import ForgetConfig, SplitConfig
from erasure.core.data import seeded_perm, to_model_range
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, read_metadata, save_tensors

FIELDS = ("train", "val", "forget", "retain", "test", "test_forget", "original_train", "original_val")


@dataclass
class Split:
    """Index sets: train/val/forget/retain index the dataset's train split, test/test_forget its test split."""

    train: torch.Tensor
    val: torch.Tensor
    forget: torch.Tensor  # subset of train
    retain: torch.Tensor  # train minus forget
    test: torch.Tensor  # the test set for TA (class-wise: without the forgotten class)
    test_forget: torch.Tensor  # class-wise: the forgotten class's test images; random: empty
    original_train: torch.Tensor  # what the original model trains on (split.original: own -> its own draw)
    original_val: torch.Tensor  # what picks the original model's best epoch

    def save(self, path: str | Path, fingerprint: str) -> None:
        """Indices as int64 safetensors, with the fingerprint of the settings that made them."""
        save_tensors(path, {k: getattr(self, k) for k in FIELDS}, {"format": "erasure-split/1", "fingerprint": fingerprint})

    @classmethod
    def load(cls, path: str | Path, fingerprint: str) -> Split:
        """Load a saved split, refusing one made with other settings."""
        found = read_metadata(path).get("fingerprint")
        if found != fingerprint:
            raise ErasureError(f"'{path}' holds a split made with other settings ({found}, now {fingerprint}); use another workdir.")
        tensors = load_tensors(path)
        return cls(**{k: tensors[k] for k in FIELDS})


def make_split(train_labels: torch.Tensor, test_labels: torch.Tensor, split: SplitConfig, forget: ForgetConfig) -> Split:
    """The seeded split and forget set for the given labels."""
    n = len(train_labels)
    if split.val_size >= n:
        raise ErasureError(f"split.val_size={split.val_size} leaves no training images (the train split has {n}).")
    original_seed = split.seed + 1 if split.original_seed is None else split.original_seed
    draw = draw_val if split.rng == "torch" else draw_val_numpy
    val, train = draw(train_labels, torch.arange(n), split.val_size, split.seed, split.stratify)  # train in seeded order
    if split.train_limit is not None:
        train = train[: split.train_limit]
    train = train.sort().values
    if split.original == "own":
        # The original model's own split of the same images (train and val together), drawn again.
        original_val, original_train = draw(train_labels, torch.cat([train, val]).sort().values, len(val), original_seed, split.stratify)
        original_train, original_val = original_train.sort().values, original_val.sort().values
    else:
        original_train, original_val = train, val
    test = torch.arange(len(test_labels))
    if split.test_limit is not None:
        test = seeded_perm(len(test_labels), split.seed + 1)[: split.test_limit].sort().values

    if forget.kind == "random":
        k = int(round(forget.fraction * len(train)))
        if not 0 < k < len(train):
            raise ErasureError(f"forget.fraction={forget.fraction} of {len(train)} training images leaves an empty forget or retain set.")
        is_forget = torch.zeros(len(train), dtype=torch.bool)
        if split.rng == "numpy":  # the reference's replace_class: RandomState(seed).choice over the train positions
            is_forget[torch.from_numpy(np.random.RandomState(forget.seed).choice(len(train), k, replace=False))] = True
        else:
            is_forget[seeded_perm(len(train), forget.seed)[:k]] = True
        test_forget = torch.zeros(0, dtype=torch.long)
    else:
        c = forget.class_index
        is_forget = train_labels[train] == c
        if not is_forget.any():
            raise ErasureError(f"class {c} has no training images to forget.")
        test_forget, test = test[test_labels[test] == c], test[test_labels[test] != c]
    return Split(train, val, train[is_forget], train[~is_forget], test, test_forget, original_train, original_val)


def draw_val(labels: torch.Tensor, candidates: torch.Tensor, size: int, seed: int, stratify: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, the rest) of ``candidates`` (indices into ``labels``): ``size`` of them, seeded, per class if ``stratify``.

    The validation indices come sorted; the rest stay in the seeded order (``train_limit`` keeps a prefix).
    """
    order = candidates[seeded_perm(len(candidates), seed)]
    is_val = torch.zeros(len(order), dtype=torch.bool)
    is_val[stratified(labels[order], size) if stratify else slice(0, size)] = True
    return order[is_val].sort().values, order[~is_val]


def draw_val_numpy(
    labels: torch.Tensor, candidates: torch.Tensor, size: int, seed: int, stratify: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, the rest) of ``candidates`` as the reference's ``cifar10_dataloaders`` draws them, both sorted.

    One numpy ``RandomState(seed)``; for each class in class order, ``choice`` of its share of
    ``size`` (10% of each CIFAR-10 class for 5,000) among the class's candidates, without replacement.
    """
    rng = np.random.RandomState(seed)
    own = labels[candidates]
    classes, quota = class_quotas(own, size)
    picked = [rng.choice(candidates[own == c].numpy(), q, replace=False) for c, q in zip(classes.tolist(), quota.tolist())]
    val = torch.from_numpy(np.sort(np.concatenate(picked))).long()
    return val, candidates[~torch.isin(candidates, val)]


def class_quotas(labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, how many of ``size`` each gives): size * n_c / n, the largest remainders rounded up."""
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * size / len(labels)
    quota = exact.floor().long()
    quota[(exact - quota).argsort(descending=True, stable=True)[: size - int(quota.sum())]] += 1
    return classes, quota


def stratified(labels: torch.Tensor, size: int) -> torch.Tensor:
    """Positions of the first images of each class in ``labels``' order, ``size`` in all, each class its share.

    Class c gives size * n_c / n images, rounded so that the shares sum to ``size`` (the
    largest remainders round up): 500 of each CIFAR-10 class for 5,000.
    """
    classes, quota = class_quotas(labels, size)
    picked = [torch.nonzero(labels == c).flatten()[:q] for c, q in zip(classes.tolist(), quota.tolist())]
    return torch.cat(picked).sort().values


def augment(images: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a uint8 batch, on its device."""
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=g.device).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g, device=g.device).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    out = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    flip = (torch.rand(b, generator=g, device=g.device) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> the network's float input in [-1, 1]; channels-last on the GPU (faster convolutions)."""
    x = to_model_range(images)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x
