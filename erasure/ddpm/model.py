"""The class-conditional DDPM: a diffusers ``UNet2DModel``, its noise schedule and DDIM sampling.

Under ``model.conventions: reference`` the UNet is :class:`ClassConcatUNet2DModel`, the
reference's ``Conditional_Model`` layout on diffusers' blocks.

Class ``num_classes`` is the null class: training replaces labels with it at the
class-dropout rate, which gives classifier-free guidance its unconditional branch.
Guidance follows the reference form ``(1 + w) * eps(x, c) - w * eps(x, null)``.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding
from tqdm.auto import tqdm

from erasure.core.errors import ErasureError
from erasure.core.io import read_json
from erasure.ddpm.config import ModelConfig, SampleConfig

# UNet2DModel's settings for each model.conventions (see ModelConfig); padding 0 makes
# diffusers' Downsample2D pad right and bottom by one, as the reference's Downsample.
CONVENTIONS = {
    "reference": {"flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "downsample_padding": 0},
    "diffusers": {"flip_sin_to_cos": True, "freq_shift": 0, "norm_eps": 1e-5, "downsample_padding": 1},
}


class _Half(torch.nn.Module):
    """An embedding written into one half of a vector twice its width, zeros in the other half."""

    def __init__(self, inner: torch.nn.Module, first: bool) -> None:
        super().__init__()
        self.inner, self.first = inner, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.inner(x)
        return F.pad(e, (0, e.shape[-1]) if self.first else (e.shape[-1], 0))


class ClassConcatUNet2DModel(UNet2DModel):
    """``UNet2DModel`` whose ResNet blocks read the time and class embeddings side by side.

    The reference's ``Conditional_Model`` (the DDIM code base) gives every ResNet block
    ``Linear(silu([t_emb, c_emb]))``, where ``UNet2DModel`` adds the two. Both are
    ``time_embedding_dim // 2`` wide: the time MLP (sinusoid -> Linear, silu, Linear) and the
    class MLP (a table of ``num_class_embeds`` rows, the last the null class, -> Linear, silu,
    Linear). The time MLP fills the first half of a ``time_embedding_dim`` vector and the class
    MLP the second, so ``UNet2DModel``'s own sum of the two *is* their concatenation and its
    forward runs unchanged.
    """

    # The same signature as UNet2DModel's, so that from_pretrained rebuilds it from config.json.
    @functools.wraps(UNet2DModel.__init__)
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        width, channels = c.time_embedding_dim // 2, c.block_out_channels[0]
        self.time_embedding = _Half(TimestepEmbedding(channels, width), first=True)
        table = torch.nn.Embedding(c.num_class_embeds, channels)
        self.class_embedding = _Half(torch.nn.Sequential(table, TimestepEmbedding(channels, width)), first=False)


UNET_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, ClassConcatUNet2DModel)}


def build_unet(config: ModelConfig, image_shape: tuple[int, int, int], num_classes: int) -> UNet2DModel:
    """A fresh class-conditional UNet; one extra class embedding is the null class."""
    channels, size, _ = image_shape
    levels = len(config.channels)
    if size % 2 ** (levels - 1):
        raise ErasureError(f"{size}px images cannot be halved {levels - 1} times; shorten model.channels.")
    resolutions = [size // 2**i for i in range(levels)]  # of each level, first (full size) to last
    if config.attention_resolutions is None:
        attend = [config.attention and i > 0 for i in range(levels)]  # every level but the first
    else:
        missing = sorted(set(config.attention_resolutions) - set(resolutions))
        if config.attention and missing:
            raise ErasureError(
                f"model.attention_resolutions {missing} match no level of this UNet (its levels are {resolutions} px); "
                f"pick from those, e.g. model.attention_resolutions=[{resolutions[min(1, levels - 1)]}]."
            )
        attend = [config.attention and r in config.attention_resolutions for r in resolutions]
    down = ["AttnDownBlock2D" if attend[i] else "DownBlock2D" for i in range(levels)]
    # Up block i works at the resolution of level levels - 1 - i (the lowest first).
    up = ["AttnUpBlock2D" if attend[levels - 1 - i] else "UpBlock2D" for i in range(levels)]
    # The reference's embeddings are 4x the first level's channels each; concatenated, 8x.
    reference = config.conventions == "reference"
    cls, time_dim = (ClassConcatUNet2DModel, 8 * config.channels[0]) if reference else (UNet2DModel, None)
    return cls(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(config.channels),
        layers_per_block=config.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        add_attention=config.attention,
        attention_head_dim=config.attention_head_dim,  # None: one head over all channels (the reference's AttnBlock)
        dropout=config.dropout,
        norm_num_groups=config.norm_groups,
        num_class_embeds=num_classes + 1,
        time_embedding_dim=time_dim,
        **CONVENTIONS[config.conventions],
    )


def null_class(unet: UNet2DModel) -> int:
    """The label of the unconditional (null) class."""
    return unet.config.num_class_embeds - 1


def noise_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The linear-beta DDPM schedule the model is trained with."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps)


def draw_timesteps(n: int, steps: int, generator: torch.Generator, device: torch.device, antithetic: bool = True) -> torch.Tensor:
    """``n`` training timesteps in ``[0, steps)``.

    Antithetic (the SalUn DDPM code, after the DDIM code base): half are drawn uniformly and
    the other half are their mirror images ``steps - 1 - t``, which lowers the variance of a
    batch's loss; ``antithetic=False`` draws all ``n`` independently.
    """
    if not antithetic:
        return torch.randint(0, steps, (n,), generator=generator, device=device)
    t = torch.randint(0, steps, (n // 2 + 1,), generator=generator, device=device)
    return torch.cat([t, steps - 1 - t])[:n]


def add_noise(
    scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator, antithetic: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw (t, noise) with ``generator`` and return (x_t, noise, t); timesteps as :func:`draw_timesteps`."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = draw_timesteps(len(x0), scheduler.config.num_train_timesteps, generator, x0.device, antithetic)
    return scheduler.add_noise(x0, noise, t), noise, t


def eps(unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The noise prediction for the given labels."""
    return unet(x_t, t, class_labels=labels).sample


def eps_of_batches(unet: torch.nn.Module, *batches: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    """The noise predictions of several ``(x_t, t, labels)`` batches, from one UNet call.

    The UNet treats each sample on its own (group norm, no batch statistics), so each part
    is what its own call would give. One call launches every kernel once instead of once
    per batch, and a small model on a GPU waits mostly on launches.
    """
    x_t, t, labels = (torch.cat(parts) for parts in zip(*batches))
    return list(eps(unet, x_t, t, labels).split([len(b[0]) for b in batches]))


def guided_eps(unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: float, null: int) -> torch.Tensor:
    """Classifier-free guided noise prediction, conditional and null branches in one batch."""
    t = t.expand(len(x_t)) if t.ndim else t.repeat(len(x_t))
    both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample
    cond, uncond = both.chunk(2)
    return (1 + w) * cond - w * uncond


def denoising_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    labels: torch.Tensor,
    g: torch.Generator,
    antithetic: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """The standard DDPM loss on (eps_pred - noise)^2: its per-element mean, or with ``reduction="sum"``
    its sum over the pixels averaged over the batch (the reference's ``noise_estimation_loss_conditional``)."""
    x_t, noise, t = add_noise(scheduler, x0, g, antithetic)
    pred = eps(unet, x_t, t, labels)
    if reduction == "sum":
        return (pred - noise).square().flatten(1).sum(1).mean()
    return F.mse_loss(pred, noise)


@torch.no_grad()
def sample(
    unet: torch.nn.Module,
    labels: torch.Tensor,
    config: SampleConfig,
    seed: int,
    num_train_timesteps: int = 1000,
    batch_size: int = 256,
    progress: bool = True,
    first: int = 0,
) -> torch.Tensor:
    """DDIM samples in [-1, 1], one per label.

    Image ``i``'s starting noise depends only on ``seed`` and ``i``, so two models sampled
    with the same labels and seed start from the same noise: comparisons are paired.
    ``first`` is the index of ``labels[0]`` in a larger set sampled in parts: the part
    starting at a multiple of ``batch_size`` gets exactly the images the whole call makes.
    """
    device = next(unet.parameters()).device
    # No x0 clipping inside the loop: with guidance it collapses small models' samples
    # (demo base model, w = 2, 25 steps: 47% class-faithful with clipping, 100% without).
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False)
    steps, eta = config.resolved()
    scheduler.set_timesteps(steps)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    null = null_class(unet)
    out = []
    batches = range(0, len(labels), batch_size)
    for start in tqdm(batches, desc="sampling", disable=not progress or len(batches) < 2, leave=False):
        chunk = labels[start : start + batch_size].to(device)
        at = first + start
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + at + i)) for i in range(len(chunk))]
        )
        x = noise.to(device)
        g = torch.Generator(device=device).manual_seed(seed + at)
        for t in scheduler.timesteps:
            e = guided_eps(unet, x, t.to(device), chunk, config.guidance, null)
            x = scheduler.step(e, t, x, eta=eta, generator=g).prev_sample
        out.append(x.clamp(-1, 1).float().cpu())
    return torch.cat(out)


def sampling_record(config: SampleConfig) -> dict[str, object]:
    """What a result must say about how its images were sampled."""
    steps, eta = config.resolved()
    return {
        "protocol": config.protocol,
        "sampler": "ddim",
        "steps": steps,
        "eta": eta,
        "guidance": config.guidance,
        "guidance_form": "(1 + w) * eps(x, c) - w * eps(x, null)",
    }


def save_model(unet: UNet2DModel, scheduler: DDPMScheduler, folder: str | Path) -> None:
    """Save UNet and noise schedule in the diffusers layout, atomically per folder."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp, safe_serialization=True)
    scheduler.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_scheduler(folder: str | Path) -> DDPMScheduler:
    """The noise schedule saved beside a UNet (the default one if none was saved)."""
    if (Path(folder) / "scheduler_config.json").is_file():
        return DDPMScheduler.from_pretrained(folder)
    return noise_scheduler()


def load_unet(folder: str | Path, device: str | torch.device = "cpu") -> UNet2DModel:
    """Load a UNet saved by :func:`save_model` (or any diffusers ``UNet2DModel`` folder), of the class its config names."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ErasureError(f"'{folder}' holds no UNet (config.json missing); train or point at a model folder.")
    name = read_json(folder / "config.json").get("_class_name", "UNet2DModel")
    if name not in UNET_CLASSES:
        raise ErasureError(f"the model in '{folder}' is a {name}; a class-conditional DDPM is one of {sorted(UNET_CLASSES)}.")
    try:
        unet = UNET_CLASSES[name].from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ErasureError(f"could not load the UNet in '{folder}' ({e}).") from None
    if unet.config.num_class_embeds is None:
        raise ErasureError(f"the UNet in '{folder}' is not class-conditional (num_class_embeds is unset).")
    return unet.to(device).eval()
