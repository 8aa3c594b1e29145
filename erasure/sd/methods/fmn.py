"""Forget-Me-Not (attention re-steering): stop the UNet attending to the concept's tokens.

Loss: the L2 norm of the cross-attention probabilities at the concept's token positions
(and the end token), summed over every ``attn2`` layer, on forget latents with their
prompts. There is no denoising term; only cross-attention weights are trained.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor

from erasure.sd.methods.base import SD_METHODS, SDMethod
from erasure.sd.model import token_positions


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


@SD_METHODS.register("fmn")
class FMN(SDMethod):
    """Attention re-steering on the cross-attention weights."""

    section = "fmn"
    needs = ("forget",)

    def trainable(self, name: str) -> bool:
        return ".attn2." in name

    def prepare(self, model: torch.nn.Module) -> None:
        ctx = self.ctx
        forget = ctx.sets["forget"]
        tokens = forget.embeddings.shape[1]
        words = ctx.concept.words
        self.positions = torch.zeros(len(forget.prompts), tokens, device=ctx.device)
        for i, prompt in enumerate(forget.prompts):
            self.positions[i, token_positions(ctx.pipe, prompt, words)] = 1
            if ctx.config.fmn.include_end_token:
                end = len(ctx.pipe.tokenizer(prompt, truncation=True, max_length=tokens).input_ids) - 1
                self.positions[i, end] = 1
        self.probe = AttentionProbe(model)

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        ctx = self.ctx
        latents, emb, p = ctx.sets["forget"].batch(g, ctx.config.train.batch_size)
        x_t, _, t = ctx.noisy(latents, g)
        self.probe.maps.clear()
        model(x_t, t, encoder_hidden_states=emb)
        keep = self.positions[p][:, None, None, :]
        loss = sum(torch.linalg.vector_norm((m.float() * keep).flatten(1), dim=1).mean() for m in self.probe.maps)
        self.probe.maps.clear()
        return loss, {}
