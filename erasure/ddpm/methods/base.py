"""The interface every erasure method implements, and the name registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from diffusers import DDPMScheduler

from erasure.core.data import EpochSampler, random_flip
from erasure.core.registry import Registry
from erasure.core.saliency import Mask
from erasure.ddpm.config import SampleConfig, UnlearnConfig


@dataclass
class EraseContext:
    """What a method may use: settings, the noise schedule and the data (in [-1, 1], on device)."""

    config: UnlearnConfig
    sample: SampleConfig
    scheduler: DDPMScheduler
    forget_images: torch.Tensor  # images of the forgotten class
    retain_images: torch.Tensor  # images of every other class ...
    retain_labels: torch.Tensor  # ... and their labels
    forget_class: int
    target_class: int  # the misaligned class the forgotten one is steered to
    null_class: int
    random_flip: bool = False  # data.random_flip: every batch a method takes is flipped at random (p = 0.5)
    rank: int = 0  # this process's index under `accelerate launch`: each process reads its own order
    step: int = 0  # the training step, set before each loss; under data_order=epochs it picks the batches
    _samplers: dict[str, EpochSampler] = field(default_factory=dict, init=False, repr=False)  # per set, made at first use

    def draw(self, images: torch.Tensor, g: torch.Generator, n: int | None = None) -> torch.Tensor:
        """Indices of a random batch from ``images``."""
        return torch.randint(0, len(images), (n or self.config.batch_size,), generator=g, device=images.device)

    def batch(self, which: Literal["forget", "retain"], g: torch.Generator) -> torch.Tensor:
        """Indices of this step's forget or retain batch, in ``unlearn.data_order``.

        ``epochs``: the step's batch of shuffled passes over the set, the last of each pass
        smaller, as the reference's cycled loaders; a function of the step, so a resumed run
        continues the same order. ``random``: :meth:`draw`.
        """
        images = self.forget_images if which == "forget" else self.retain_images
        if self.config.data_order == "random":
            return self.draw(images, g)
        if which not in self._samplers:
            seed = (self.config.seed * 2 + (which == "retain")) * 1_009 + self.rank
            self._samplers[which] = EpochSampler(len(images), self.config.batch_size, seed, images.device)
        return self._samplers[which](self.step)

    def in_shuffled_order(self, images: torch.Tensor, n: int, g: torch.Generator) -> list[torch.Tensor]:
        """One pass over ``images`` in a random order: the indices of consecutive batches of ``n`` (the last holds the rest).

        The reference's forget loader (``shuffle=True``, no ``drop_last``); the SD path's
        ``LatentSet.in_order`` is the same pass in dataset order, as its reference reads.
        """
        return list(torch.randperm(len(images), generator=g, device=g.device).to(images.device).split(n))

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A batch as the method sees it: flipped at random with ``random_flip``, else ``x`` itself."""
        return random_flip(x, g) if self.random_flip else x

    def labels(self, label: int, n: int) -> torch.Tensor:
        """A batch of one label on the data's device."""
        return torch.full((n,), label, dtype=torch.long, device=self.forget_images.device)

    def drop(self, labels: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
        """``labels`` with each one replaced by the null class with probability ``p``.

        This is the classifier-free-guidance condition dropout the base model was trained
        with; the reference erasure keeps it on (see ``UnlearnConfig.retain_cond_drop``).
        """
        if p <= 0:
            return labels
        hit = torch.rand(labels.shape, generator=g, device=g.device).to(labels.device) < p
        return torch.where(hit, torch.full_like(labels, self.null_class), labels)


class Method:
    """An erasure method: :meth:`make_mask` (optional), :meth:`prepare`, then :meth:`loss` per step."""

    name: ClassVar[str]

    def __init__(self, ctx: EraseContext) -> None:
        self.ctx = ctx

    def make_mask(self, model: torch.nn.Module) -> Mask | None:
        """The weights this method may change (None: all of them)."""
        return None

    def prepare(self, model: torch.nn.Module) -> None:
        """One-off setup before training (e.g. a frozen teacher)."""

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The loss of one step, and numbers worth logging."""
        raise NotImplementedError


METHODS: Registry[type[Method]] = Registry("method")
register = METHODS.register
get_method = METHODS.get
