"""Tiny random Stable Diffusion pipelines (SD 1.x and SDXL) built from configs, for tests and offline trials.

Every component has the real architecture family (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, a byte-level ``CLIPTokenizer``; for SDXL also a
``CLIPTextModelWithProjection`` and a ``text_time`` UNet) at a few million parameters in
all, so every command of the SD path can be tried on a laptop without downloading
anything. They generate noise-like 16 px images; they are not models of anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from erasure.sd.model import quiet_loading


def byte_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (with and without ``</w>``), no merges.

    ``pad_token``: SD 1.x's tokenizer (and SDXL's first) pads with end-of-text, SDXL's second with ``!``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE maps each byte to a printable character; the 188 printable bytes map to themselves.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32, pad_token=pad_token)


def tiny_pipeline(tokenizer_folder: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD pipeline: 16 px images, 8x8x4 latents, 32-d text embeddings."""
    quiet_loading()
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(tokenizer_folder)
    unet = tiny_unet(cross_attention_dim=32)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(text_config(tokenizer, 32))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet(**config) -> UNet2DConditionModel:
    """The tiny pipelines' UNet: 8x8 latents (16 px images), two blocks, one with cross-attention; ``config`` adds to it."""
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        **config,
    )


def tiny_vae(**config) -> AutoencoderKL:
    """A two-level VAE: 16 px images to 8x8x4 latents."""
    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def text_config(tokenizer: CLIPTokenizer, width: int, **config) -> CLIPTextConfig:
    """A two-layer CLIP text encoder ``width`` wide over ``tokenizer``'s vocabulary."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )


def tiny_xl_pipeline(tokenizer_folder: str | Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """A random-weight SDXL pipeline: 16 px images, 8x8x4 latents, 32 + 48 = 80-d text embeddings, 16-d pooled.

    The SDXL base's structure at toy size: a ``CLIPTextModel`` and a
    ``CLIPTextModelWithProjection`` (the second tokenizer pads with ``!``), a UNet with
    ``addition_embed_type="text_time"`` whose added embedding reads the pooled projection and
    six size ids, linear projections in its transformers, and SDXL's VAE scaling and
    Euler scheduler settings.
    """
    quiet_loading()
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(tokenizer_folder)
    tokenizer_2 = byte_tokenizer(tokenizer_folder, pad_token="!")
    text_encoder = CLIPTextModel(text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, 48, projection_dim=16))
    time_dim = 8
    unet = tiny_unet(
        cross_attention_dim=32 + 48,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 16,
    )
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
