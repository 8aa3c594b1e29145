"""Textual inversion: new token embeddings that stand for a concept, learned from its images.

FMN's first stage, as the reference runs it (SHI-Labs Forget-Me-Not ``train_ti.py`` with
``configs/ti.yaml``):

- ``N`` placeholder tokens per concept (``<s1>`` … ``<sN>``, numbered on across concepts) join a
  copy of the tokenizer; their embeddings start from the concept's own tokens, the rest
  random with σ 1 (``initializer_tokens: taylor|swift|<rand-1>|<rand-1>``);
- each step: one of the concept's forget images (shuffled epochs; flipped with p 0.5), the
  denoising loss under "a photo of <s1>…<sN>" (the FMN template), in fp32, through the frozen
  UNet and text encoder; one such run per concept, as the reference runs ``train_ti.py`` per concept;
- AdamW (lr 1e-3, weight decay 0.1, constant) on the input embedding; after each step every
  other row is restored and the new rows' norms are pulled toward 0.4 by min(1, 100·lr) of the
  way (``clip_ti_decay``).

The text encoder is a copy in fp32 (loaded afresh where the pipeline's runs in bf16). Only
the new rows change; the pipeline's own tokenizer and text encoder are left as they were.
The learned rows are kept in the run folder (``textual_inversion.safetensors``), where a
resumed run reads them back.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from erasure.core.data import EpochSampler, random_flip
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, save_tensors
from erasure.core.stages import is_main_process
from erasure.sd.config import FMNConfig
from erasure.sd.model import Conditioning, family_of, load_component

if TYPE_CHECKING:
    from erasure.sd.methods.base import SDContext

NORM_TARGET = 0.4  # train_ti.py's clip_ti_decay pulls each new embedding's norm toward this


@dataclass
class LearnedTokens:
    """The augmented tokenizer and fp32 text encoder, and each concept's snippet of placeholder tokens."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    snippets: list[str]  # per concept, e.g. "<s1><s2><s3><s4>"

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        """The conditioning of ``prompts`` (which may hold the placeholder tokens), fp32."""
        return Conditioning(self.text_encoder(self.ids(prompts))[0])

    def ids(self, prompts: list[str]) -> torch.Tensor:
        t = self.tokenizer
        out = t(prompts, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt")
        return out.input_ids.to(self.text_encoder.device)


def pull_norms(rows: torch.Tensor, lr: float) -> torch.Tensor:
    """``clip_ti_decay``: each row's direction kept, its norm moved min(1, 100·lr) of the way to 0.4."""
    norm = rows.norm(dim=-1, keepdim=True)
    return F.normalize(rows, dim=-1) * (norm + min(1.0, 100 * lr) * (NORM_TARGET - norm))


def learn_tokens(ctx: SDContext, unet: torch.nn.Module, cfg: FMNConfig, seed: int) -> LearnedTokens:
    """Learn ``cfg.ti_tokens`` embeddings per concept of ``ctx.concept`` from the forget set ``ctx.sets['forget']``."""
    if family_of(ctx.pipe).name != "StableDiffusionPipeline":
        raise ErasureError("FMN's textual inversion supports SD 1.x and 2.x (one text encoder); set fmn.textual_inversion=false.")
    if ctx.pipe.text_encoder.dtype == torch.float32:
        encoder = copy.deepcopy(ctx.pipe.text_encoder)
    else:  # the pipeline's runs in low precision (model.frozen_dtype): the fp32 weights, afresh
        model = ctx.config.model
        encoder = load_component(CLIPTextModel, model.pretrained, "text_encoder", model.revision).to(ctx.device)
    encoder.requires_grad_(False)
    tokenizer = copy.deepcopy(ctx.pipe.tokenizer)
    table = encoder.get_input_embeddings().weight
    g = torch.Generator(ctx.device).manual_seed(seed * 1_000_003 + 4_243)

    snippets, inits, ids = [], [], []
    for k, part in enumerate(ctx.concept.concepts):
        names = [f"<s{k * cfg.ti_tokens + i + 1}>" for i in range(cfg.ti_tokens)]
        if tokenizer.add_tokens(names) != len(names):
            raise ErasureError(f"the tokenizer already holds one of {names}; FMN's placeholder tokens must be new.")
        own = tokenizer(part.concept, add_special_tokens=False).input_ids[: cfg.ti_tokens]
        random_rows = torch.randn(cfg.ti_tokens - len(own), table.shape[1], generator=g, device=g.device).to(table.device)
        inits.append(torch.cat([table[own].detach(), random_rows]))
        snippets.append("".join(names))
        ids.append(tokenizer.convert_tokens_to_ids(names))
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set below
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for rows, init in zip(ids, inits):
            table[rows] = init.to(table.dtype)
    learned = LearnedTokens(tokenizer, encoder, snippets)
    saved = ctx.folder / "textual_inversion.safetensors" if ctx.folder is not None else None
    if saved is not None and saved.is_file():  # learned before this run was interrupted (the folder's fingerprint is the config's)
        with torch.no_grad():
            table[sum(ids, [])] = load_tensors(saved, table.device)["embeddings"]
        return learned
    table.requires_grad_(True)

    # One inversion per concept, on its own images, as the reference runs train_ti.py once per concept.
    forget = ctx.sets["forget"]
    prompt_concept = torch.tensor(ctx.concept.part_of("forget"), device=forget.prompt_index.device)
    item_concept = prompt_concept[forget.prompt_index]
    prompt_ids = learned.ids([cfg.template.format(s) for s in snippets])  # one row per concept
    dtype = next(unet.parameters()).dtype
    for k, rows in enumerate(ids):
        items = torch.nonzero(item_concept == k).flatten().to(ctx.device)
        others = torch.ones(len(table), dtype=torch.bool, device=table.device)
        others[rows] = False
        original = table.detach().clone()
        sampler = EpochSampler(len(items), 1, seed * 1_009 + k, ctx.device)
        optimizer = torch.optim.AdamW([table], lr=cfg.ti_lr, weight_decay=cfg.ti_weight_decay)
        for step in range(cfg.ti_steps):
            idx = items[sampler(step)]
            latents = random_flip(forget.sample(idx, g), g)  # the image's flip, on its latents
            x_t, target, t = ctx.noisy(latents, g)
            with torch.autocast(ctx.device.type, enabled=False):
                hidden = encoder(prompt_ids[k : k + 1].expand(len(idx), -1))[0]
                pred = unet(x_t.to(dtype), t, encoder_hidden_states=hidden.to(dtype)).sample
                loss = F.mse_loss(pred.float(), target.float())
            (grad,) = torch.autograd.grad(loss, table)  # the UNet's weights get no gradient
            table.grad = grad.masked_fill(others[:, None], 0)
            optimizer.step()
            with torch.no_grad():
                table[others] = original[others]  # the decay moved every row: only this concept's learn
                table[rows] = pull_norms(table[rows], cfg.ti_lr)
    table.requires_grad_(False)
    if saved is not None and is_main_process():  # as the reference keeps step_inv_500.safetensors
        save_tensors(saved, {"embeddings": table[sum(ids, [])].detach().cpu()}, {"snippets": json.dumps(snippets)})
    return learned
