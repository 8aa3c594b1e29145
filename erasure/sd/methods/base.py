"""The interface of Stable Diffusion erasure methods, their shared context and registry.

A method says which UNet weights it trains (:meth:`SDMethod.trainable`), optionally makes
a saliency mask, and gives the loss of one step. Everything else (optimizer, precision,
DDP, checkpoints, export) belongs to the shared training loop and :mod:`erasure.sd.pipeline`.

A closed-form method (UCE) sets ``closed_form`` and changes the weights in
:meth:`SDMethod.edit` instead; it skips the loop, and its export is the same.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline

from erasure.core.loop import shard
from erasure.core.registry import Registry
from erasure.core.saliency import Mask
from erasure.core.stages import is_main_process
from erasure.sd.config import Concept, SDConfig
from erasure.sd.model import Conditioning


@dataclass
class LatentSet:
    """Training images as VAE latents, each with the index of its prompt in ``embeddings``.

    With ``std`` (``train.latents=sample``) every read of an image draws a fresh sample of its
    VAE posterior, ``latents + std * randn``, as the references encode each batch anew
    (``LatentDiffusion.get_input``, FMN's ``latent_dist.sample()``); without it every read
    gives the posterior mean.
    """

    latents: torch.Tensor  # [N, 4, h, w]: the posterior mean
    prompt_index: torch.Tensor  # [N] long
    embeddings: Conditioning  # P rows: each prompt's conditioning
    prompts: list[str]
    std: torch.Tensor | None = None  # [N, 4, h, w]: the posterior's standard deviation

    def __len__(self) -> int:
        return len(self.latents)

    def random_indices(self, g: torch.Generator, n: int) -> torch.Tensor:
        """``n`` items drawn at random with replacement."""
        return torch.randint(0, len(self.latents), (n,), generator=g, device=g.device)

    def batch(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, Conditioning, torch.Tensor]:
        """A random batch (``n`` draws with replacement): latents, their prompts' conditioning, and the prompt indices."""
        return self.take(self.random_indices(g, n), g)

    def take(self, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, Conditioning, torch.Tensor]:
        """The items ``idx``: latents (see :meth:`sample`), their prompts' conditioning, and the prompt indices."""
        idx = idx.to(self.latents.device)
        p = self.prompt_index[idx]
        return self.sample(idx, g), self.embeddings[p], p

    def sample(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The latents of items ``idx``: a fresh posterior sample each (drawn from ``g``), or the means without ``std``."""
        idx = idx.to(self.latents.device)
        mean = self.latents[idx]
        if self.std is None:
            return mean
        return mean + self.std[idx] * torch.randn(mean.shape, generator=g, device=g.device).to(mean.device)

    def in_order(self, n: int) -> list[torch.Tensor]:
        """One pass in dataset order: the indices of consecutive batches of ``n`` (the last holds the rest)."""
        return list(torch.arange(len(self.latents), device=self.latents.device).split(n))


def steps_per_epoch(items: int, batch_size: int, processes: int = 1) -> int:
    """Steps of one pass over ``items`` at ``batch_size`` per process (a last, smaller batch counts)."""
    return math.ceil(items / (batch_size * processes))


@dataclass
class EpochOrder:
    """Which forget and retain items each step of SalUn trains on under ``train.data_order=epochs``.

    The reference before its last rewrite (``random_label.py``, ``nsfw_removal.py``): each
    epoch is one pass over the forget set in dataset order (unshuffled loader, the last batch
    smaller); beside it a retain iterator, started afresh every epoch and restarted whenever it
    runs out. Each retain pass is a new random order (the Imagenette loader shuffles).

    On several processes a step's global batch is ``batch_size x processes`` consecutive items,
    split evenly between them; a last batch with fewer items than processes repeats some. Every
    index is a function of the step, so a resumed run reads what the uninterrupted one would.
    Indices are made on ``device`` from host integers: no step waits for the GPU.
    """

    forget: int  # items in the forget set
    retain: int  # items in the retain set
    batch_size: int  # per process
    process: int = 0
    processes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self._orders: dict[tuple, torch.Tensor] = {}  # made once per device (forget) or per pass (retain)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.forget, self.batch_size, self.processes)

    def forget_indices(self, step: int, device: torch.device) -> torch.Tensor:
        """This process's forget items at ``step``: batch ``step mod steps_per_epoch`` of the ordered pass."""
        key = ("forget", str(device))
        if key not in self._orders:
            self._orders[key] = torch.arange(self.forget, device=device)
        return self._share(self._orders[key], step % self.steps_per_epoch)

    def retain_indices(self, step: int, device: torch.device) -> torch.Tensor:
        """This process's retain items at ``step``: the retain iterator restarts every epoch and cycles within it."""
        epoch, position = divmod(step, self.steps_per_epoch)
        restart, k = divmod(position, steps_per_epoch(self.retain, self.batch_size, self.processes))
        key = ("retain", str(device), epoch, restart)
        if key not in self._orders:  # a new pass: drop the previous one's order
            self._orders = {k_: v for k_, v in self._orders.items() if k_[0] == "forget"}
            g = torch.Generator(device).manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + restart)
            # The order of random keys: on the device without a host round trip (CUDA's randperm may build small ones on the host).
            self._orders[key] = torch.rand(self.retain, generator=g, device=device).argsort()
        return self._share(self._orders[key], k)

    def _share(self, order: torch.Tensor, k: int) -> torch.Tensor:
        """This process's part of global batch ``k`` of ``order``."""
        size = self.batch_size * self.processes
        start = k * size
        count = min(size, len(order) - start)
        if count < self.processes:  # fewer items than processes: each takes one, some twice
            return order[start + self.process % count : start + self.process % count + 1]
        part = shard(count, self.process, self.processes)
        return order[start + part.start : start + part.stop]


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
    process: int = 0  # this process's index in a multi-process run, and their number (ordered data splits batches)
    processes: int = 1
    folder: Path | None = None  # the run's folder: where a method keeps what it made before training (FMN's tokens)

    def noise(self, latents: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise, t)``: the forward process's noise for ``latents`` and random timesteps."""
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), generator=g, device=g.device)
        t = t.to(latents.device)
        return torch.randn(latents.shape, generator=g, device=g.device).to(latents.device), t

    def noisy(self, latents: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, target, t)`` for random timesteps; the target is what the UNet should predict.

        That is the noise for epsilon-prediction models (SD 1.x, SD 2 base) and the velocity
        for v-prediction ones (SD 2.x at 768 px).
        """
        noise, t = self.noise(latents, g)
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
        self.step = 0  # the 0-based training step whose loss is asked for (set by the loop before each call)

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


def warn_unlike_recipe(method: str, train: object, recipe: str, values: dict[str, object]) -> list[str]:
    """Print (main process) and return the ``train.*`` settings of this run that differ from the method's reference recipe.

    The ``train:`` defaults of the schema are SalUn's, so ``--method esd-x`` or ``--method fmn``
    on a SalUn config trains with SalUn's length, batch and learning rate; this says so.
    """
    ours = {k: getattr(train, k) for k in values}
    if ours.get("grad_clip") == 0:
        ours["grad_clip"] = None  # 0 turns clipping off too
    differ = [f"train.{k}={ours[k]} (recipe: {v})" for k, v in values.items() if ours[k] != v]
    if getattr(train, "epochs", None) is not None:  # epochs replace steps
        differ = [d for d in differ if not d.startswith("train.steps=")] + [
            f"train.epochs={train.epochs} (recipe: steps {values['steps']})"
        ]
    if differ and is_main_process():
        print(
            f"warning: {method} runs with {', '.join(differ)}; its reference recipe is {recipe}. "
            "Run it from that config (or set these keys) to train as the reference does.",
            file=sys.stderr,
        )
    return differ
