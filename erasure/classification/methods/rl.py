"""RL: train on the forget set with random labels and on the retain set with true ones.

The default schedule is the reference's CIFAR-10 one (``passes``): every epoch first runs
over the forget set, each batch relabelled uniformly over all classes (the true class
included) from that step's generator, then over the retain set with true labels. The
other schedules are named options (:data:`erasure.classification.config.RLSchedule`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from erasure.classification.methods.base import Method, UnlearnContext, register
from erasure.classification.train import Pass, Relabel
from erasure.core.errors import ErasureError


def uniform_labels(num_classes: int) -> Relabel:
    """Relabel a batch uniformly over all ``num_classes`` classes, from the step's generator (fresh every batch)."""

    def relabel(idx: torch.Tensor, labels: torch.Tensor, g: torch.Generator, epoch: int) -> torch.Tensor:
        return torch.randint(0, num_classes, labels.shape, generator=g, device=g.device).to(labels.device)

    return relabel


def per_epoch_labels(num_forget: int, num_classes: int, seed: int) -> Relabel:
    """Relabel the first ``num_forget`` entries of a mixed set with labels drawn once per epoch over all classes."""
    cache: dict[int, torch.Tensor] = {}

    def relabel(idx: torch.Tensor, labels: torch.Tensor, g: torch.Generator, epoch: int) -> torch.Tensor:
        if epoch not in cache:  # a function of (seed, epoch) only, so a resumed run draws the same
            cache.clear()
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randint(0, num_classes, (num_forget,), generator=gen).to(labels.device)
        forget = idx < num_forget
        return torch.where(forget, cache[epoch][idx.clamp(max=num_forget - 1)], labels)

    return relabel


def rl_passes(ctx: UnlearnContext, schedule: str) -> list[Pass]:
    """The training passes of one RL (or SalUn) epoch under ``schedule``."""
    k = ctx.num_classes
    if schedule == "passes":
        return [
            Pass(ctx.forget_images, ctx.forget_labels, relabel=uniform_labels(k), name="forget"),
            Pass(ctx.retain_images, ctx.retain_labels, name="retain"),
        ]
    images = torch.cat([ctx.forget_images, ctx.retain_images])
    if schedule == "mixed":
        labels = torch.cat([ctx.forget_labels, ctx.retain_labels])
        return [Pass(images, labels, relabel=per_epoch_labels(len(ctx.forget_labels), k, ctx.config.unlearn.seed), name="mixed")]
    if schedule == "mixed_fixed":
        labels = torch.cat([ctx.random_labels(ctx.forget_labels), ctx.retain_labels])
        return [Pass(images, labels, name="mixed")]
    raise ErasureError(f"unknown RL schedule '{schedule}'; choose passes, mixed or mixed_fixed.")


@register("rl")
class RandomLabel(Method):
    def run(self, model: nn.Module) -> nn.Module:
        cfg = self.ctx.config.unlearn.rl
        return self.ctx.fit_passes(model, rl_passes(self.ctx, cfg.schedule), cfg.epochs, cfg.lr, desc="rl")
