"""Loading and saving Stable Diffusion pipelines, and the frozen parts used in training.

Any diffusers ``StableDiffusionPipeline`` works: a hub id (users online) or a local folder
(air-gapped clusters). The safety checker is always off: this is a research tool whose job
is to measure what the model itself generates, and every run's config says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from erasure.core.errors import ErasureError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of frozen modules (VAE, text encoder, ESD teacher): 'auto' is bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def load_pipeline(pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline from a hub id, a local pipeline folder or an erasure run folder; safety checker off."""
    local = Path(pretrained).expanduser()
    looks_local = local.exists() or pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
    if looks_local and not (local / "model_index.json").is_file() and (local / "model" / "model_index.json").is_file():
        local = local / "model"  # an erasure run folder: its exported pipeline
    if looks_local and not (local / "model_index.json").is_file():
        raise ErasureError(
            f"'{pretrained}' is not a diffusers pipeline folder (no model_index.json). "
            "Give a folder written by save_pretrained, an erasure run folder, or a hub id such as CompVis/stable-diffusion-v1-4."
        )
    quiet_loading()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if looks_local else pretrained,
            revision=revision,
            torch_dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as e:
        raise ErasureError(
            f"could not load the Stable Diffusion pipeline '{pretrained}': {str(e).splitlines()[0]} "
            "Check the hub id (and your network or HF_HUB_OFFLINE), or pass a local folder."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_loading() -> None:
    """Silence the per-component loading bars of diffusers and transformers (our own bars stay)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def noise_scheduler(pipe: StableDiffusionPipeline) -> DDPMScheduler:
    """The training-time noise schedule of the pipeline (same betas as its sampler)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def ddim_scheduler(pipe: StableDiffusionPipeline) -> DDIMScheduler:
    """A DDIM sampler on the pipeline's schedule (ESD draws its intermediate latents with it)."""
    return DDIMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """CLIP text embeddings ``[len(prompts), tokens, dim]`` on the text encoder's device."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = pipe.tokenizer(
            prompts[i : i + batch_size],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(pipe.text_encoder.device)
        out.append(pipe.text_encoder(ids)[0])
    return torch.cat(out)


def token_positions(pipe: StableDiffusionPipeline, prompt: str, words: str) -> list[int]:
    """Positions of the tokens of ``words`` inside the tokenized ``prompt`` (FMN needs them)."""
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    target = pipe.tokenizer(words, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(target) + 1):
        if ids[start : start + len(target)] == target:
            return list(range(start, start + len(target)))
    raise ErasureError(f"the concept '{words}' does not occur in the prompt '{prompt}'; FMN needs the concept's words in its prompts.")


@torch.no_grad()
def encode_images(pipe: StableDiffusionPipeline, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VAE latents (posterior mean, scaled) of uint8 images ``[N, 3, H, W]``."""
    vae = pipe.vae
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(vae.device, vae.dtype) / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out).float()


def load_unet(pretrained: str, revision: str | None = None) -> UNet2DConditionModel:
    """Only the UNet of a pipeline (fp32), e.g. the base weights a delta is made against."""
    local = Path(pretrained).expanduser()
    if not (local / "model_index.json").is_file() and (local / "model" / "model_index.json").is_file():
        local = local / "model"
    source = str(local) if (local / "model_index.json").is_file() else pretrained
    quiet_loading()
    try:
        return UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision)
    except (OSError, ValueError) as e:
        raise ErasureError(f"could not load the UNet of '{pretrained}': {str(e).splitlines()[0]}") from None
