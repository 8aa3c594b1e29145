"""Training a classifier through the shared loop: epochs become steps, batches come from the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

from erasure.classification.config import ClassificationConfig, RecipeConfig
from erasure.classification.data import EpochSampler, augment, to_input
from erasure.classification.model import resnet18
from erasure.core.io import load_tensors, save_tensors
from erasure.core.loop import LoopSettings, train
from erasure.core.saliency import Mask

# (model, inputs, labels, epoch) -> (loss, numbers to log)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The plain classification loss (no label smoothing)."""
    return F.cross_entropy(model(x), y), {}


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


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: RecipeConfig,
    folder: str | Path,
    accelerator: Accelerator,
    fingerprint: str,
    loss_fn: LossFn = cross_entropy,
    constraint_mask: Mask | None = None,
    desc: str = "training",
) -> nn.Module:
    """Train ``model`` on uint8 ``images`` (already on the device) for ``recipe.epochs`` epochs.

    Resumes from ``folder/checkpoint``; ``constraint_mask`` freezes its False entries bit for bit.
    """
    sampler = EpochSampler(len(labels), recipe.batch_size, recipe.seed, images.device)
    spe = sampler.steps_per_epoch

    def step_loss(model: nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = sampler(step)
        x = augment(images[idx], g) if recipe.augment else images[idx]
        return loss_fn(model, to_input(x), labels[idx], sampler.epoch(step))

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
        checkpoint_every=recipe.checkpoint_every * spe,
        log_every=max(1, spe // 4),
        desc=desc,
    )
    if accelerator.device.type == "cuda":
        model = model.to(accelerator.device, memory_format=torch.channels_last)
    model, _ = train(model, step_loss, settings, folder, accelerator, constraint_mask=constraint_mask, fingerprint=fingerprint)
    return model
