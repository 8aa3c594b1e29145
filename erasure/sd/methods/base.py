"""The interface of Stable Diffusion erasure methods, their shared context and registry.

A method says which UNet weights it trains (:meth:`SDMethod.trainable`), optionally makes
a saliency mask, and gives the loss of one step. Everything else (optimizer, precision,
DDP, checkpoints, export) belongs to the shared training loop and :mod:`erasure.sd.pipeline`.

A closed-form method (UCE) sets ``closed_form`` and changes the weights in
:meth:`SDMethod.edit` instead; it skips the loop, and its export is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline

from erasure.core.registry import Registry
from erasure.core.saliency import Mask
from erasure.sd.config import Concept, SDConfig
from erasure.sd.model import Conditioning


@dataclass
class LatentSet:
    """Training images as VAE latents, each with the index of its prompt in ``embeddings``."""

    latents: torch.Tensor  # [N, 4, h, w]
    prompt_index: torch.Tensor  # [N] long
    embeddings: Conditioning  # P rows: each prompt's conditioning
    prompts: list[str]

    def batch(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, Conditioning, torch.Tensor]:
        """A random batch: latents, their prompts' conditioning, and the prompt indices."""
        idx = torch.randint(0, len(self.latents), (n,), generator=g, device=g.device).to(self.latents.device)
        p = self.prompt_index[idx]
        return self.latents[idx], self.embeddings[p], p


@dataclass
class SDContext:
    """What a method may use."""

    config: SDConfig
    concept: Concept
    pipe: DiffusionPipeline  # frozen VAE and text encoder(s) (its UNet is the model being trained)
    scheduler: DDPMScheduler
    sets: dict[str, LatentSet]  # 'forget' / 'retain', as the method asked for
    uncond: Conditioning  # one row: the empty prompt's conditioning
    device: torch.device
    size: int | None = None  # training image size in px (SDXL's size conditioning); None: the model's native size

    def noisy(self, latents: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, t)`` for random timesteps; the target is what the UNet should predict.

        That is the noise for epsilon-prediction models (SD 1.x, SD 2 base) and the velocity
        for v-prediction ones (SD 2.x at 768 px).
        """
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=g, device=g.device)
        t = t.to(latents.device)
        noise = torch.randn(latents.shape, generator=g, device=g.device).to(latents.device)
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return self.scheduler.add_noise(latents, noise, t), target, t

    def encode(self, prompts: list[str]) -> Conditioning:
        """The conditioning of ``prompts`` (fp32, on the training device)."""
        from erasure.sd.model import encode_conditioning

        return encode_conditioning(self.pipe, prompts, self.size).float().to(self.device)


def eps(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The denoiser's prediction (noise, or velocity for v-prediction models) under ``cond``."""
    return model(x_t, t, **cond.model_inputs()).sample


def denoising_loss(model: torch.nn.Module, ctx: SDContext, latents: torch.Tensor, emb: Conditioning, g: torch.Generator) -> torch.Tensor:
    """The standard latent-diffusion loss (per-element mean)."""
    x_t, target, t = ctx.noisy(latents, g)
    return F.mse_loss(eps(model, x_t, t, emb).float(), target.float())


def eps_of_batches(model: torch.nn.Module, *batches: tuple[torch.Tensor, torch.Tensor, Conditioning]) -> list[torch.Tensor]:
    """The predictions of several ``(x_t, t, cond)`` batches, from one UNet call.

    The UNet treats each sample on its own (group norm, no batch statistics), so each part
    is what its own call would give; one larger call keeps the GPU busier than two, and
    launches every kernel once.
    """
    x_t, t = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return list(eps(model, x_t, t, Conditioning.cat([b[2] for b in batches])).split([len(b[0]) for b in batches]))


class SDMethod:
    """An SD erasure method."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # image sets the method trains on ('forget', 'retain')
    section: ClassVar[str | None] = None  # the config section only this method reads; other methods' runs ignore it
    closed_form: ClassVar[bool] = False  # True: edit() sets the weights directly, without the training loop
    unused_weights: ClassVar[bool] = False  # True: some trainable weights get no gradient (see StageAccelerator)

    def __init__(self, ctx: SDContext) -> None:
        self.ctx = ctx

    def trainable(self, name: str) -> bool:
        """Whether the UNet parameter ``name`` is trained (the rest are frozen)."""
        return True

    def make_mask(self, model: torch.nn.Module) -> Mask | None:
        """The entries this method may change (None: all trainable ones)."""
        return None

    def prepare(self, model: torch.nn.Module) -> None:
        """One-off setup before training (e.g. a frozen teacher)."""

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The loss of one step, and numbers worth logging (tensors are read only on logged steps)."""
        raise NotImplementedError

    def edit(self, model: torch.nn.Module) -> dict[str, Any]:
        """A closed-form method's edit of ``model``'s weights, in place; returns numbers for ``done.json``.

        Called instead of the training loop when ``closed_form`` is True (no mask, no
        optimizer, no checkpoints: an edit takes seconds and is redone if interrupted).
        """
        raise NotImplementedError


SD_METHODS: Registry[type[SDMethod]] = Registry("Stable Diffusion method")
