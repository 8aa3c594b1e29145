"""Training a classifier through the shared loop: epochs become steps, batches come from the device.

Under ``accelerate launch`` with N processes every step draws the single-process run's
global batch (same indices, augmentation and random labels on every process) and each
process trains on its contiguous shard of it; DDP averages the gradients, each shard's loss
weighted by its share of the batch, so one step is the single-process step whatever N.
BatchNorm normalizes with the global batch's statistics (``sync_batchnorm``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

from erasure.classification.config import ClassificationConfig, RecipeConfig
from erasure.classification.data import augment, to_input
from erasure.classification.metrics import predict
from erasure.classification.model import CHANNEL_STATS, resnet18
from erasure.core.batchnorm import synced_batchnorm
from erasure.core.data import EpochSampler
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, save_tensors, write_json
from erasure.core.loop import LoopSettings, Monitor, shard, shard_weight, train
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
    stats = CHANNEL_STATS.get(config.data.name) if config.model.input_norm == "reference" else None
    return resnet18(num_classes, in_channels, config.model.width, stats)


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

    def check_shardable(self, processes: int, desc: str) -> None:
        """Refuse a schedule with a batch too small to give each of ``processes`` processes at least one image."""
        for part, sampler in zip(self.passes, self.samplers):
            if sampler.smallest_batch < processes:
                raise ErasureError(
                    f"{desc}: the {part.name or 'training'} pass ends each epoch with a batch of {sampler.smallest_batch} image(s), "
                    f"fewer than the {processes} processes, so a process would get none. Set drop_last=true for this recipe "
                    "(train., retrain. or unlearn.drop_last), change its batch_size, or launch fewer processes."
                )

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
    sync_bn: bool = True,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``model`` on uint8 ``images`` (already on the device) for ``recipe.epochs`` epochs.

    The loss defaults to cross-entropy with the recipe's label smoothing (the original model
    and Retrain). Resumes from ``folder/checkpoint``; ``constraint_mask`` freezes its False
    entries bit for bit; ``sync_bn`` and ``val`` as in :func:`fit_passes`.
    """
    loss_fn = loss_fn if loss_fn is not None else smoothed_cross_entropy(recipe.label_smoothing)
    passes = [Pass(images, labels, loss_fn)]
    return fit_passes(model, passes, recipe, folder, accelerator, fingerprint, constraint_mask, desc, sync_bn, val=val)


def fit_passes(
    model: nn.Module,
    passes: list[Pass],
    recipe: RecipeConfig,
    folder: str | Path,
    accelerator: Accelerator,
    fingerprint: str,
    constraint_mask: Mask | None = None,
    desc: str = "training",
    sync_bn: bool = True,
    mask_hold: bool = True,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Train ``model`` for ``recipe.epochs`` epochs, each running ``passes`` in order (see :class:`PassSchedule`).

    One optimizer and one lr schedule span all passes, as in the reference's RL. Resumes
    from ``folder/checkpoint``; ``constraint_mask`` freezes its False entries bit for bit
    (and zeroes their optimizer state) after every step, or with ``mask_hold=False`` only
    masks their gradients. With several processes each trains
    on its shard of every global batch (see the module's docstring); ``sync_bn`` (the
    config's ``sync_batchnorm``) normalizes with the global batch's statistics. With
    ``recipe.select`` = ``best_val`` the returned weights are those of the epoch that scored
    best on ``val`` (images, labels), and ``folder/selection.json`` records every epoch's score.
    """
    schedule = PassSchedule(passes, recipe.batch_size, recipe.seed, recipe.augment, recipe.drop_last)
    spe = schedule.steps_per_epoch
    processes, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if processes > 1:
        schedule.check_shardable(processes, desc)

    def step_loss(model: nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = schedule.batch(step, g)  # the global batch: g is the same on every process (global_batches)
        part = shard(len(b.labels), rank, processes)
        # The images may live on the CPU (a caller's tensors); a batch on the device already stays put.
        images, labels = b.images[part].to(device, non_blocking=True), b.labels[part].to(device, non_blocking=True)
        loss, logs = passes[b.pass_index].loss_fn(model, to_input(images), labels, b.epoch)
        return loss * shard_weight(part, len(b.labels), processes), logs

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
        global_batches=True,
        mask_hold=mask_hold,
        desc=desc,
    )
    best = None
    if recipe.select == "best_val":
        if val is None or val[1] is None or not len(val[1]):
            raise ErasureError(f"{desc}: select=best_val needs validation images; set split.val_size > 0, or select=last.")
        seed = recipe.seed if recipe.augment and recipe.val_augment else None
        best = BestOnValidation(*val, spe, accelerator, augment_seed=seed)
    if accelerator.device.type == "cuda":
        model = model.to(accelerator.device, memory_format=torch.channels_last)
    with synced_batchnorm(model, accelerator, sync_bn):
        model, _ = train(model, step_loss, settings, folder, accelerator, constraint_mask, fingerprint, monitor=best)
    if best is not None:
        best.restore(model)
        if accelerator.is_main_process:
            write_json(Path(folder) / "selection.json", best.record())
    return model


class BestOnValidation(Monitor):
    """After every epoch, score the model on the validation images and keep the best epoch's weights.

    The reference keeps its original model this way (``model_SA_best``: validation accuracy
    after each epoch, a strictly higher score replacing the kept one). The kept weights and
    every epoch's score travel with the run's checkpoints, so a resumed run keeps what the
    uninterrupted one would. With ``augment_seed`` the images are cropped and flipped before
    each scoring (a draw seeded by it and the epoch), as the reference's validation loader,
    which keeps the training transform, sees them.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, steps_per_epoch: int, accelerator: Accelerator, augment_seed: int | None = None
    ) -> None:
        self.images, self.labels, self.steps_per_epoch, self.accelerator = images, labels, steps_per_epoch, accelerator
        self.augment_seed = augment_seed
        self.scores: list[float] = []  # validation accuracy (percent) after each epoch
        self.weights: dict[str, torch.Tensor] = {}  # the best epoch's state dict, on the CPU

    @property
    def best_epoch(self) -> int:
        """The 1-based epoch with the highest score (the first, on ties); 0 before the first epoch ends."""
        return max(range(len(self.scores)), key=self.scores.__getitem__) + 1 if self.scores else 0

    def after_step(self, model: nn.Module, step: int) -> None:
        if step % self.steps_per_epoch:
            return
        images = self.images
        if self.augment_seed is not None:
            epoch = step // self.steps_per_epoch
            images = augment(images, torch.Generator(images.device).manual_seed(self.augment_seed * 1_000_003 + epoch))
        score = predict(model, images, self.labels, 512, self.accelerator).accuracy
        model.train()
        self.scores.append(score)
        if self.best_epoch == len(self.scores):
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.weights, {"scores": self.scores}

    def load(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        self.weights, self.scores = dict(tensors), list(values.get("scores", []))

    def postfix(self) -> dict[str, str]:
        if not self.scores:
            return {}
        return {"val": f"{self.scores[-1]:.2f}%", "best": f"{max(self.scores):.2f}% (epoch {self.best_epoch})"}

    def restore(self, model: nn.Module) -> None:
        """Put the best epoch's weights into ``model``."""
        model.load_state_dict(self.weights)

    def record(self) -> dict:
        """What ``selection.json`` holds."""
        best = self.best_epoch
        scores = self.scores
        augmented = self.augment_seed is not None
        return {
            "select": "best_val",
            "epoch": best,
            "val_accuracy": scores[best - 1],
            "val_images": len(self.labels),
            "val_augmented": augmented,
            "scores": scores,
        }
