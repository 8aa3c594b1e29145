"""The interface every classification-unlearning method implements, and the name registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from accelerate import Accelerator

from erasure.classification.config import ClassificationConfig, RecipeConfig
from erasure.classification.train import LossFn, Pass, cross_entropy, fit_passes
from erasure.core.registry import Registry
from erasure.core.saliency import Mask


@dataclass
class UnlearnContext:
    """What a method may use: the settings, its run folder and the data (uint8 images on the device)."""

    config: ClassificationConfig
    accelerator: Accelerator
    folder: Path  # the method's stage folder: checkpoints, masks
    fingerprint: str  # of the method's settings; guards its checkpoints
    forget_images: torch.Tensor
    forget_labels: torch.Tensor
    retain_images: torch.Tensor
    retain_labels: torch.Tensor
    num_classes: int
    val_images: torch.Tensor | None = None  # the validation split: only a recipe with select=best_val reads it
    val_labels: torch.Tensor | None = None

    def recipe(self, epochs: int, lr: float) -> RecipeConfig:
        """The unlearning recipe: SGD with momentum at a constant lr, the shared batch size and augmentation."""
        u = self.config.unlearn
        return RecipeConfig(
            epochs=epochs,
            batch_size=u.batch_size,
            lr=lr,
            momentum=u.momentum,
            weight_decay=u.weight_decay,
            schedule="constant",
            augment=u.augment,
            drop_last=u.drop_last,
            checkpoint_every=u.checkpoint_every,
            seed=u.seed,
        )

    def fit(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        epochs: int,
        lr: float,
        loss_fn: LossFn = cross_entropy,
        mask: Mask | None = None,
        desc: str = "unlearning",
    ) -> nn.Module:
        """Train ``model`` on one set through the shared loop (resumable from this method's folder)."""
        return self.fit_passes(model, [Pass(images, labels, loss_fn)], epochs, lr, mask, desc)

    def fit_passes(
        self,
        model: nn.Module,
        passes: list[Pass],
        epochs: int,
        lr: float,
        mask: Mask | None = None,
        desc: str = "unlearning",
        mask_hold: bool = True,
    ) -> nn.Module:
        """Train ``model`` with every epoch running ``passes`` in order (e.g. RL's forget pass, then its retain pass)."""
        recipe, sync_bn = self.recipe(epochs, lr), self.config.sync_batchnorm
        return fit_passes(model, passes, recipe, self.folder, self.accelerator, self.fingerprint, mask, desc, sync_bn, mask_hold)

    def random_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """A seeded random label for each image, never its true one (RL's ``mixed_fixed`` schedule only)."""
        g = torch.Generator().manual_seed(self.config.unlearn.seed)
        shift = torch.randint(1, self.num_classes, (len(labels),), generator=g).to(labels.device)
        return (labels + shift) % self.num_classes


class Method:
    """A classification-unlearning method: :meth:`run` turns the original model into the unlearned one."""

    name: ClassVar[str]

    def __init__(self, ctx: UnlearnContext) -> None:
        self.ctx = ctx
        self.info: dict[str, Any] = {}  # extra numbers for done.json

    def run(self, model: nn.Module) -> nn.Module:
        """Unlearn: ``model`` is a fresh copy of the original model on the device."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("classification-unlearning method")
register = METHODS.register
get_method = METHODS.get
