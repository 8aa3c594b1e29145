"""Training a classifier through the shared loop: epochs become steps, batches come from the device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

from erasure.classification.config import ClassificationConfig, RecipeConfig
from erasure.classification.data import EpochSampler, augment, to_input
from erasure.classification.model import resnet18
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, save_tensors
from erasure.core.loop import LoopSettings, train
from erasure.core.saliency import Mask

# (model, inputs, labels, epoch) -> (loss, numbers to log)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The plain classification loss (no label smoothing): every unlearning method trains with it, as the reference."""
    return F.cross_entropy(model(x), y), {}


def smoothed_cross_entropy(label_smoothing: float) -> LossFn:
    """Cross-entropy against targets mixed with the uniform distribution (``recipe.label_smoothing``); plain CE at 0."""
    if label_smoothing == 0:
        return cross_entropy

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        return F.cross_entropy(model(x), y, label_smoothing=label_smoothing), {}

    return loss


def build_model(config: ClassificationConfig, in_channels: int, num_classes: int, seed: int) -> nn.Module:
    """A freshly initialized ResNet-18 (seeded)."""
    torch.manual_seed(seed)
    return resnet18(num_classes, in_channels, config.model.width)


def save_model(model: nn.Module, path: str | Path) -> None:
    """The state dict (weights and BatchNorm statistics) as safetensors."""
    save_tensors(path, model.state_dict())


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights saved by :func:`save_model` into ``model``."""
    model.load_state_dict(load_tensors(path))
    return model


# (indices into the pass's set, their true labels, the step's generator, epoch) -> the labels to train on
Relabel = Callable[[torch.Tensor, torch.Tensor, torch.Generator, int], torch.Tensor]


@dataclass
class Pass:
    """One pass of every epoch over a set of uint8 images (on the device), with its own loss.

    ``relabel``, when given, replaces the true labels of each batch (RL's random labels);
    it draws from the step's generator, so labels are reproducible and survive a resume.
    """

    images: torch.Tensor
    labels: torch.Tensor
    loss_fn: LossFn = cross_entropy
    relabel: Relabel | None = None
    name: str = ""


@dataclass
class Batch:
    """What one training step sees."""

    pass_index: int
    indices: torch.Tensor  # into the pass's images
    images: torch.Tensor  # uint8, augmented when the recipe augments
    labels: torch.Tensor  # the labels trained on (relabelled where the pass relabels)
    epoch: int


class PassSchedule:
    """Steps -> batches: each epoch runs ``passes`` one after the other, each over a fresh seeded permutation.

    Pass ``p`` of epoch ``e`` covers each of its images once; with one pass this is plain
    epoch-wise training. The permutation of pass ``p`` is seeded by ``seed + p`` and the
    epoch, so a step's batch depends only on (seed, step) and a resumed run sees the
    batches the uninterrupted one would have.
    """

    def __init__(self, passes: list[Pass], batch_size: int, seed: int, augment_images: bool = False, drop_last: bool = False) -> None:
        if not passes:
            raise ErasureError("a training schedule needs at least one pass.")
        self.passes, self.augment = passes, augment_images
        self.samplers = [EpochSampler(len(p.labels), batch_size, seed + i, p.images.device, drop_last) for i, p in enumerate(passes)]
        self.offsets = [0]
        for sampler in self.samplers:
            self.offsets.append(self.offsets[-1] + sampler.steps_per_epoch)
        self.steps_per_epoch = self.offsets[-1]

    def locate(self, step: int) -> tuple[int, int, int]:
        """(epoch, pass index, step within that pass's epoch) of a global step."""
        epoch, within = divmod(step, self.steps_per_epoch)
        p = max(i for i in range(len(self.passes)) if self.offsets[i] <= within)
        return epoch, p, within - self.offsets[p]

    def batch(self, step: int, g: torch.Generator) -> Batch:
        """The batch of ``step``; random labels first, then augmentation, both from ``g``."""
        epoch, p, i = self.locate(step)
        part, sampler = self.passes[p], self.samplers[p]
        idx = sampler(epoch * sampler.steps_per_epoch + i)
        labels = part.labels[idx]
        if part.relabel is not None:
            labels = part.relabel(idx, labels, g, epoch)
        x = augment(part.images[idx], g) if self.augment else part.images[idx]
        return Batch(p, idx, x, labels, epoch)


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: RecipeConfig,
    folder: str | Path,
    accelerator: Accelerator,
    fingerprint: str,
    loss_fn: LossFn | None = None,
    constraint_mask: Mask | None = None,
    desc: str = "training",
) -> nn.Module:
    """Train ``model`` on uint8 ``images`` (already on the device) for ``recipe.epochs`` epochs.

    The loss defaults to cross-entropy with the recipe's label smoothing (the original model
    and Retrain). Resumes from ``folder/checkpoint``; ``constraint_mask`` freezes its False
    entries bit for bit.
    """
    loss_fn = loss_fn if loss_fn is not None else smoothed_cross_entropy(recipe.label_smoothing)
    return fit_passes(model, [Pass(images, labels, loss_fn)], recipe, folder, accelerator, fingerprint, constraint_mask, desc)


def fit_passes(
    model: nn.Module,
    passes: list[Pass],
    recipe: RecipeConfig,
    folder: str | Path,
    accelerator: Accelerator,
    fingerprint: str,
    constraint_mask: Mask | None = None,
    desc: str = "training",
) -> nn.Module:
    """Train ``model`` for ``recipe.epochs`` epochs, each running ``passes`` in order (see :class:`PassSchedule`).

    One optimizer and one lr schedule span all passes, as in the reference's RL. Resumes
    from ``folder/checkpoint``; ``constraint_mask`` freezes its False entries bit for bit
    (and zeroes their optimizer state) after every step.
    """
    schedule = PassSchedule(passes, recipe.batch_size, recipe.seed, recipe.augment, recipe.drop_last)
    spe = schedule.steps_per_epoch

    def step_loss(model: nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = schedule.batch(step, g)
        return passes[b.pass_index].loss_fn(model, to_input(b.images), b.labels, b.epoch)

    settings = LoopSettings(
        steps=recipe.epochs * spe,
        lr=recipe.lr,
        seed=recipe.seed,
        grad_clip=None,
        warmup_steps=recipe.warmup_epochs * spe,
        cosine=recipe.schedule == "cosine",
        milestones=tuple(m * spe for m in recipe.milestones) if recipe.schedule == "multistep" else (),
        gamma=recipe.gamma,
        weight_decay=recipe.weight_decay,
        optimizer="sgd",
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        checkpoint_every=recipe.checkpoint_every * spe,
        log_every=max(1, spe // 4),
        desc=desc,
    )
    if accelerator.device.type == "cuda":
        model = model.to(accelerator.device, memory_format=torch.channels_last)
    model, _ = train(model, step_loss, settings, folder, accelerator, constraint_mask=constraint_mask, fingerprint=fingerprint)
    return model
