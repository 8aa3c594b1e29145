"""Forget-Me-Not (attention re-steering): stop the UNet attending to the concept's tokens.

As in the reference (SHI-Labs ``train_attn.py`` with ``configs/attn.yaml``):

- positions: every occurrence of the concept's tokens in the prompt, plus every position
  holding the end-of-text token of the padded prompt (``use_pooler``; SD 1.x pads with
  that token, so the padding counts too) - ``fmn.eot_positions``;
- loss: one L2 norm over the attention probabilities at those positions, gathered from
  every ``attn2`` layer, head, query and batch item and concatenated - ``fmn.reduction``;
- no denoising term; the whole UNet is trained (``only_optimize_ca: false``) - ``fmn.params``.

The reference's optimizer settings (AdamW 2e-6, weight decay 0.01, 35 steps, batch 1) are
in ``configs/sd/nudity_fmn.yaml``, without gradient clipping: ``configs/attn.yaml`` sets
``max_grad_norm: 1`` but, with ``only_optimize_ca: false``, ``train_attn.py`` hands the clip
the generator ``unet.parameters()`` that AdamW has already consumed, so nothing is clipped
(``train.grad_clip=1.0`` clips as it intended).

Prompts (``fmn.prompts: template``): every image of a concept is prompted "a photo of
{snippet}", the positions the snippet's tokens. The snippet is the concept's learned tokens:
the reference's textual-inversion stage (``use_ti: true``) runs first
(:mod:`erasure.sd.textual_inversion`); with ``fmn.textual_inversion=false`` it is the concept's
name, as the reference's ``use_ti: false``. ``fmn.prompts=forget`` prompts each image with its
own forget prompt and marks the spec's ``words`` in it (our earlier behaviour).

Several concepts: the forget set is their union, and each image's prompt and positions are
those of its own concept.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor

from erasure.core.errors import ErasureError
from erasure.sd.methods.base import SD_METHODS, SDMethod, eps, warn_unlike_recipe
from erasure.sd.textual_inversion import learn_tokens

# The reference's training settings (configs/attn.yaml; its clip is a no-op, see above), which
# the `train:` section of a run config must set for FMN (the schema's defaults are SalUn's).
FMN_RECIPE = (
    "configs/sd/nudity_fmn.yaml",
    {"steps": 35, "batch_size": 1, "lr": 2e-6, "weight_decay": 0.01, "grad_clip": None, "weights_dtype": "fp32"},
)


class AttentionProbe:
    """Records the attention probabilities of every cross-attention layer of a UNet.

    The probabilities only exist outside fused SDPA kernels, so the probed layers switch
    to diffusers' plain :class:`AttnProcessor`, whose ``get_attention_scores`` we wrap.
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.maps: list[torch.Tensor] = []
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.set_processor(AttnProcessor())
                module.get_attention_scores = self._recording(module.get_attention_scores, module.heads)

    def _recording(self, scores, heads: int):
        def get_attention_scores(query, key, attention_mask=None):
            probs = scores(query, key, attention_mask)
            self.maps.append(probs.unflatten(0, (-1, heads)))  # [batch, heads, queries, tokens]
            return probs

        return get_attention_scores


def concept_positions(tokenizer, prompt: str, words: str, eot: str = "all") -> torch.Tensor:
    """A bool vector over the padded prompt's tokens: the concept's positions and the EOT ones.

    ``eot``: "all" adds every position whose token is the tokenizer's end-of-text token (the
    reference's ``use_pooler``), "first" only the one ending the prompt, "none" none.
    """
    length = tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    concept = tokenizer(words, add_special_tokens=False).input_ids
    marked = torch.zeros(length, dtype=torch.bool)
    for start in range(length - len(concept) + 1):  # every occurrence, as the reference marks them
        if ids[start : start + len(concept)] == concept:
            marked[start : start + len(concept)] = True
    if not marked.any():
        raise ErasureError(f"the concept '{words}' does not occur in the prompt '{prompt}'; FMN needs the concept's words in its prompts.")
    end = tokenizer.eos_token_id
    if eot == "all":
        marked |= torch.tensor(ids) == end
    elif eot == "first":
        marked[ids.index(end)] = True
    return marked


def attention_loss(maps: list[torch.Tensor], positions: torch.Tensor, reduction: str = "global") -> torch.Tensor:
    """The reference's FMN loss: the L2 norm of the attention paid to ``positions``.

    ``maps``: per layer ``[batch, heads, queries, tokens]``; ``positions``: ``[batch, tokens]``.
    "global" takes one norm over every selected probability of every layer (the reference
    concatenates them and calls ``.norm()``); "per_layer" sums each layer's norm.
    """
    keep = positions[:, None, None, :].to(maps[0].device)
    selected = [(m.float() * keep).flatten() for m in maps]
    if reduction == "global":
        return torch.linalg.vector_norm(torch.cat(selected))
    return sum(torch.linalg.vector_norm(s) for s in selected)


@SD_METHODS.register("fmn")
class FMN(SDMethod):
    """Attention re-steering."""

    section = "fmn"
    needs = ("forget",)
    unused_weights = True  # the attention loss never reaches the last cross-attention's to_v/to_out, nor the layers after it

    def trainable(self, name: str) -> bool:
        return self.ctx.config.fmn.params == "unet" or ".attn2." in name

    def prepare(self, model: torch.nn.Module) -> None:
        ctx, cfg = self.ctx, self.ctx.config.fmn
        warn_unlike_recipe(ctx.config.method, ctx.config.train, *FMN_RECIPE)
        parts = ctx.concept.part_of("forget")
        if cfg.prompts == "forget":  # each forget prompt with its own conditioning; the spec's words marked in it
            prompts, words = ctx.sets["forget"].prompts, [ctx.concept.concepts[k].words for k in parts]
            tokenizer, self.conditioning, self.row = ctx.pipe.tokenizer, None, torch.arange(len(prompts), device=ctx.device)
        else:  # one template prompt per concept, the snippet marked
            if cfg.textual_inversion:
                learned = learn_tokens(ctx, model, cfg, ctx.config.train.seed)
                tokenizer, words, encode = learned.tokenizer, learned.snippets, learned.encode
            else:
                tokenizer, words, encode = ctx.pipe.tokenizer, [part.concept for part in ctx.concept.concepts], ctx.encode
            prompts = [cfg.template.format(w) for w in words]
            self.conditioning = encode(prompts).to(ctx.device)
            self.row = torch.tensor(parts, device=ctx.device)  # forget prompt -> its concept's template
        rows = [concept_positions(tokenizer, p, w, cfg.eot_positions) for p, w in zip(prompts, words)]
        self.positions = torch.stack(rows).to(ctx.device)
        self.probe = AttentionProbe(model)

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        ctx = self.ctx
        latents, emb, p = ctx.sets["forget"].batch(g, ctx.config.train.batch_size)
        row = self.row[p]
        if self.conditioning is not None:
            emb = self.conditioning[row]
        x_t, _, t = ctx.noisy(latents, g)
        self.probe.maps.clear()
        eps(model, x_t, t, emb)  # only the attention maps it leaves in the probe are used
        loss = attention_loss(self.probe.maps, self.positions[row], ctx.config.fmn.reduction)
        self.probe.maps.clear()
        return loss, {"positions": self.positions[row].sum(1).float().mean()}
