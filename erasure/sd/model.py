"""Loading and saving Stable Diffusion pipelines, and the frozen parts used in training.

Any diffusers ``StableDiffusionPipeline`` (SD 1.x / 2.x) or ``StableDiffusionXLPipeline``
works: a hub id (users online) or a local folder (air-gapped clusters). The safety checker
is always off: this is a research tool whose job is to measure what the model itself
generates, and every run's config says so.

What differs between model families sits in one *family adapter* (:class:`ModelFamily`),
picked by the pipeline folder's ``model_index.json`` ``_class_name``: which pipeline class
loads it, and how prompts become the denoiser's :class:`Conditioning` (one text encoder's
hidden states for SD 1.x/2.x; two encoders, a pooled embedding and size ids for SDXL,
see :mod:`erasure.sd.sdxl`). Methods only ever see a :class:`Conditioning` and call
:func:`erasure.sd.methods.base.eps`, so another family (an SD3 / FLUX transformer) is one
more adapter module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from erasure.core.errors import ErasureError
from erasure.core.io import write_json
from erasure.core.registry import Registry

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of frozen modules (VAE, text encoder, ESD teacher): 'auto' is bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


@dataclass
class Conditioning:
    """What the denoiser reads besides ``x_t`` and ``t``, for a batch of prompts (one row each).

    ``hidden`` is the cross-attention input ``[N, tokens, dim]`` (``encoder_hidden_states``);
    ``added`` holds a family's extra per-row tensors (SDXL: ``text_embeds``, the pooled
    embedding, and ``time_ids``, the size and crop ids), passed as ``added_cond_kwargs``.
    It indexes, expands, concatenates and casts like a tensor, row-wise, so the methods'
    arithmetic on prompt embeddings is the same for every family.
    """

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with ``f`` applied to every tensor."""
        return dataclasses.replace(self, hidden=f(self.hidden), added={k: f(v) for k, v in self.added.items()})

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index: Any) -> Conditioning:
        return self.map(lambda x: x[index])

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def expand(self, n: int) -> Conditioning:
        """A one-row conditioning broadcast to ``n`` rows (a view, as ``Tensor.expand``)."""
        return self.map(lambda x: x.expand(n, *x.shape[1:]))

    def repeat_interleave(self, n: int) -> Conditioning:
        """Every row repeated ``n`` times in place (row i becomes rows i*n .. i*n+n-1)."""
        return self.map(lambda x: x.repeat_interleave(n, 0))

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        """Every tensor moved or cast, as ``Tensor.to``."""
        return self.map(lambda x: x.to(*args, **kwargs))

    def float(self) -> Conditioning:
        return self.to(torch.float32)

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """The rows of ``parts`` in order (as ``torch.cat`` of tensors)."""
        first = parts[0]
        added = {k: torch.cat([p.added[k] for p in parts]) for k in first.added}
        return dataclasses.replace(first, hidden=torch.cat([p.hidden for p in parts]), added=added)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the denoiser's forward (a UNet's; a transformer family would override this)."""
        if not self.added:
            return {"encoder_hidden_states": self.hidden}
        return {"encoder_hidden_states": self.hidden, "added_cond_kwargs": self.added}


class ModelFamily:
    """How one family of pipelines is loaded and conditioned; registered under its pipeline class name."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionPipeline
    load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}

    @classmethod
    def load(cls, source: str, revision: str | None, dtype: torch.dtype) -> DiffusionPipeline:
        """The pipeline at ``source`` (hub id or folder), safety checker off where it has one."""
        return cls.pipeline_class.from_pretrained(source, revision=revision, torch_dtype=dtype, **cls.load_kwargs)

    @classmethod
    def text_encoders(cls, pipe: DiffusionPipeline) -> list[torch.nn.Module]:
        """The frozen text encoders whose outputs make :attr:`Conditioning.hidden`."""
        return [pipe.text_encoder]

    @classmethod
    def hidden_states(cls, pipe: DiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(hidden, extras)`` of one batch of prompts: the cross-attention input and per-prompt tensors :meth:`added` needs."""
        raise NotImplementedError

    @classmethod
    def added(cls, pipe: DiffusionPipeline, extras: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
        """The ``added_cond_kwargs`` of prompts encoded with ``extras``, for images of ``size`` px (none for SD 1.x)."""
        return {}


FAMILIES: Registry[type[ModelFamily]] = Registry("pipeline class (model family)")


@FAMILIES.register("StableDiffusionPipeline")
class StableDiffusion(ModelFamily):
    """SD 1.x and 2.x: one CLIP text encoder, its last hidden states."""

    @classmethod
    def hidden_states(cls, pipe: DiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = pipe.tokenizer(
            prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(pipe.text_encoder.device)
        return pipe.text_encoder(ids)[0], {}


def family_of(pipe: DiffusionPipeline) -> type[ModelFamily]:
    """The family adapter of a loaded pipeline."""
    return FAMILIES.get(type(pipe).__name__)


def pipeline_folder(pretrained: str) -> Path | None:
    """The local pipeline folder ``pretrained`` names (an erasure run folder: its ``model/``), or None for a hub id."""
    local = Path(pretrained).expanduser()
    looks_local = local.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if not looks_local:
        return None
    if not (local / "model_index.json").is_file() and (local / "model" / "model_index.json").is_file():
        local = local / "model"  # an erasure run folder: its exported pipeline
    if not (local / "model_index.json").is_file():
        raise ErasureError(
            f"'{pretrained}' is not a diffusers pipeline folder (no model_index.json). "
            "Give a folder written by save_pretrained, an erasure run folder, or a hub id such as CompVis/stable-diffusion-v1-4."
        )
    return local


def pipeline_class_name(pretrained: str, revision: str | None = None) -> str:
    """The ``_class_name`` in the pipeline's ``model_index.json`` (a hub id's is fetched, or read from the cache offline)."""
    local = pipeline_folder(pretrained)
    if local is not None:
        index = local / "model_index.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(pretrained, "model_index.json", revision=revision))
        except Exception as e:  # noqa: BLE001 - any hub failure is the same problem for the user
            raise ErasureError(
                f"could not load the Stable Diffusion pipeline '{pretrained}' (its model_index.json): {str(e).splitlines()[0]} "
                "Check the hub id (and your network or HF_HUB_OFFLINE), or pass a local folder."
            ) from None
    return str(json.loads(index.read_text()).get("_class_name", "StableDiffusionPipeline"))


def load_pipeline(pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A Stable Diffusion (1.x, 2.x or XL) pipeline from a hub id, a local pipeline folder or an erasure run folder; safety checker off."""
    local = pipeline_folder(pretrained)
    class_name = pipeline_class_name(pretrained, revision)
    if class_name not in FAMILIES:
        raise ErasureError(
            f"'{pretrained}' is a {class_name}; erasure sd supports {', '.join(FAMILIES)}. Give a Stable Diffusion 1.x, 2.x or XL pipeline."
        )
    quiet_loading()
    try:
        pipe = FAMILIES.get(class_name).load(str(local) if local is not None else pretrained, revision, dtype)
    except (OSError, ValueError) as e:
        raise ErasureError(
            f"could not load the Stable Diffusion pipeline '{pretrained}': {str(e).splitlines()[0]} "
            "Check the hub id (and your network or HF_HUB_OFFLINE), or pass a local folder."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: DiffusionPipeline, folder: str | Path) -> None:
    """``save_pretrained`` in safetensors, with the scheduler's config as the loaded file had it.

    diffusers writes out every scheduler setting, also those the source file left out: SD
    v1.4's hub config names no ``timestep_spacing``, so a saved copy would fix PNDM's
    "leading" where the hub's lets each sampler keep its own default (LMS, Euler and DPM:
    "linspace"). An erased model would then sample at other timesteps than its base from
    the hub. The keys the source left out stay out.
    """
    pipe.save_pretrained(folder, safe_serialization=True)
    defaults = set(pipe.scheduler.config.get("_use_default_values", []))
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if defaults and path.is_file():
        write_json(path, {k: v for k, v in json.loads(path.read_text()).items() if k not in defaults})


def quiet_loading() -> None:
    """Silence the per-component loading bars of diffusers and transformers (our own bars stay)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def noise_scheduler(pipe: DiffusionPipeline) -> DDPMScheduler:
    """The training-time noise schedule of the pipeline (same betas as its sampler)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def ddim_scheduler(pipe: DiffusionPipeline) -> DDIMScheduler:
    """A DDIM sampler on the pipeline's schedule (ESD draws its intermediate latents with it).

    ``clip_sample=False`` explicitly, as CompVis DDIM (which never clips x̂₀): diffusers'
    DDIM defaults to clipping when the pipeline's config has no ``clip_sample`` key.
    """
    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)


def pndm_scheduler(pipe: DiffusionPipeline) -> PNDMScheduler:
    """PLMS (diffusers' ``PNDMScheduler`` with ``skip_prk_steps``) on the pipeline's schedule.

    SD v1.4's own scheduler: the newer ESD (``esd_sd.py``) samples its trajectories with the
    pipeline's scheduler unchanged, which for SD v1.4 is this one. Its 50-step grid has 51
    entries (981, 961, 961, 941, ..., 21, 1): PLMS's first step is taken twice.
    """
    return PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)


def native_size(pipe: DiffusionPipeline) -> int:
    """The image size the model was trained at (512 for SD 1.x, 1024 for SDXL)."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def encode_conditioning(pipe: DiffusionPipeline, prompts: list[str], size: int | None = None, batch_size: int = 32) -> Conditioning:
    """The denoiser's conditioning for ``prompts`` (one row each) and images of ``size`` px (None: native), on the text encoder's device."""
    family = family_of(pipe)
    hidden, extras = [], []
    for i in range(0, len(prompts), batch_size):
        h, e = family.hidden_states(pipe, prompts[i : i + batch_size])
        hidden.append(h)
        extras.append(e)
    joined = {k: torch.cat([e[k] for e in extras]) for k in extras[0]}
    return Conditioning(torch.cat(hidden), family.added(pipe, joined, size or native_size(pipe)))


def encode_prompts(pipe: DiffusionPipeline, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Text embeddings ``[len(prompts), tokens, dim]`` (the cross-attention input) on the text encoder's device."""
    return encode_conditioning(pipe, prompts, batch_size=batch_size).hidden


@torch.no_grad()
def encode_posterior(pipe: DiffusionPipeline, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of uint8 images ``[N, 3, H, W]``: its mean and standard deviation, scaled as latents are.

    A latent sample is ``mean + std * randn``, what ``latent_dist.sample()`` draws; both are
    kept so that training can draw a fresh one each time it reads an image without running
    the VAE again.
    """
    vae = pipe.vae
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(vae.device, vae.dtype) / 127.5 - 1
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.float() * vae.config.scaling_factor)
        stds.append(dist.std.float() * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds)


def encode_images(pipe: DiffusionPipeline, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VAE latents (posterior mean, scaled) of uint8 images ``[N, 3, H, W]``."""
    return encode_posterior(pipe, images, batch_size)[0]


def load_unet(
    pretrained: str, revision: str | None = None, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    """Only the UNet of a pipeline, e.g. the base weights a delta is made against; ``variant``: its diffusers variant."""
    hint = f" Does it publish the '{variant}' variant? model.unet_variant=null trains its own UNet." if variant else ""
    return load_component(UNet2DConditionModel, pretrained, "unet", revision, hint, variant=variant, torch_dtype=dtype)


def load_component(cls: type, pretrained: str, subfolder: str, revision: str | None = None, hint: str = "", **kwargs: Any) -> Any:
    """One component of a pipeline (a hub id, a pipeline folder or an erasure run folder), via ``cls.from_pretrained``."""
    local = Path(pretrained).expanduser()
    if not (local / "model_index.json").is_file() and (local / "model" / "model_index.json").is_file():
        local = local / "model"
    source = str(local) if (local / "model_index.json").is_file() else pretrained
    quiet_loading()
    try:
        return cls.from_pretrained(source, subfolder=subfolder, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        raise ErasureError(f"could not load the {subfolder} of '{pretrained}': {str(e).splitlines()[0]}{hint}") from None


# The SDXL adapter registers itself; imported last because it builds on the classes above.
from erasure.sd import sdxl  # noqa: E402, F401
