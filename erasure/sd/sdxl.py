"""The SDXL family adapter: two text encoders, a pooled embedding and size conditioning.

As ``StableDiffusionXLPipeline.encode_prompt`` (diffusers) and the ESD SDXL reference
(``esd_sdxl.py`` in rohitgandikota/erasing) condition the UNet:

- ``encoder_hidden_states``: the penultimate hidden states of both text encoders (CLIP
  ViT-L, 768 wide, and OpenCLIP ViT-bigG, 1280 wide), each on its own tokenizer's padded
  ids, concatenated to 2048 wide. The token positions are the first tokenizer's (it pads
  with end-of-text, as SD 1.x does; the second pads with ``!``), so FMN's and UCE's
  position rules carry over unchanged.
- ``added_cond_kwargs["text_embeds"]``: the projected pooled embedding of the second encoder.
- ``added_cond_kwargs["time_ids"]``: (original height, width, crop top, left, target
  height, width) = (size, size, 0, 0, size, size) for the square, uncropped training and
  generation images.

The empty prompt is encoded like any other (the ESD SDXL reference's ``negative_prompt=""``).
The diffusers pipeline's own sampling, which makes the training and audit images, uses
zeros for an absent negative prompt (``force_zeros_for_empty_prompt``), as it always has.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from erasure.core.errors import ErasureError
from erasure.sd.model import FAMILIES, ModelFamily

# original size (2), crop top-left (2), target size (2)
TIME_IDS = 6


@FAMILIES.register("StableDiffusionXLPipeline")
class StableDiffusionXL(ModelFamily):
    """SDXL base: two CLIP text encoders, ``text_time`` added conditioning, 1024 px native size."""

    pipeline_class = StableDiffusionXLPipeline
    load_kwargs = {}  # an SDXL pipeline has no safety checker to turn off

    @classmethod
    def text_encoders(cls, pipe: DiffusionPipeline) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    @classmethod
    def hidden_states(cls, pipe: DiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = []
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            out = encoder(ids.input_ids.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer of both encoders
        return torch.cat(hidden, dim=-1), {"text_embeds": out.text_embeds}  # pooled: the second encoder's projection

    @classmethod
    def added(cls, pipe: DiffusionPipeline, extras: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
        pooled = extras["text_embeds"]
        unet = pipe.unet.config
        expected = unet.projection_class_embeddings_input_dim
        given = unet.addition_time_embed_dim * TIME_IDS + pipe.text_encoder_2.config.projection_dim
        if unet.addition_embed_type != "text_time" or expected != given:
            raise ErasureError(
                f"this SDXL UNet does not take SDXL's size conditioning (addition_embed_type={unet.addition_embed_type!r}, "
                f"{expected}-wide added embedding, {given} given); "
                "use an SDXL base pipeline (e.g. stabilityai/stable-diffusion-xl-base-1.0)."
            )
        ids = torch.tensor([size, size, 0, 0, size, size], dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": ids.repeat(len(pooled), 1)}
