"""A tiny random Stable Diffusion pipeline built from configs, for tests and offline trials.

Every component has the real architecture family (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, a byte-level ``CLIPTokenizer``) at a few million
parameters in all, so every command of the SD path can be tried on a laptop without
downloading anything. It generates noise-like 16 px images; it is not a model of anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from erasure.sd.model import quiet_loading


def byte_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (with and without ``</w>``), no merges."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE maps each byte to a printable character; the 188 printable bytes map to themselves.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)


def tiny_pipeline(tokenizer_folder: str | Path, seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight SD pipeline: 16 px images, 8x8x4 latents, 32-d text embeddings."""
    quiet_loading()
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer(tokenizer_folder)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
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
