"""UCE (unified concept editing, Gandikota et al. 2023): a closed-form edit of cross-attention.

Each key and value projection ``W`` of every cross-attention layer (``attn2.to_k`` and
``attn2.to_v``: the only UNet weights that read the text) is replaced by the ``W'`` that
minimises

    lamb·‖W' − W‖² + erase_scale·Σᵢ ‖W'cᵢ − W gᵢ‖² + preserve_scale·Σⱼ ‖W'pⱼ − W pⱼ‖²

where ``cᵢ`` is the text embedding of an erased concept, ``gᵢ`` that of its guide and
``pⱼ`` those of the preserved concepts. The minimiser is

    W' = (lamb·W + erase_scale·Σ W gᵢcᵢᵀ + preserve_scale·Σ W pⱼpⱼᵀ)
         · (lamb·I + erase_scale·Σ cᵢcᵢᵀ + preserve_scale·Σ pⱼpⱼᵀ)⁻¹

so the erased concept now produces the keys and values of its guide, the preserved ones
keep theirs, and nothing else in the UNet changes. As in the reference
(``trainscripts/uce_sd_erase.py``), each prompt is represented by the embedding of its last
token before end-of-text (for the empty guide "", that is the start-of-text token), the
embeddings come from the fp32 text encoder, and many concepts are erased in one solve.

UCE is :attr:`~erasure.sd.methods.base.SDMethod.closed_form`: ``erase`` calls :meth:`UCE.edit`
instead of the training loop, then exports the model folder and delta like any method.
Defaults and options: :class:`erasure.sd.config.UCEConfig`.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline

from erasure.core.errors import ErasureError
from erasure.sd.methods.base import SD_METHODS, SDMethod
from erasure.sd.model import encode_prompts, family_of


def is_uce_weight(name: str, with_to_k: bool = True) -> bool:
    """Whether the UNet parameter ``name`` is a cross-attention projection UCE edits."""
    projections = (".attn2.to_v.weight", ".attn2.to_k.weight") if with_to_k else (".attn2.to_v.weight",)
    return name.endswith(projections)


@torch.no_grad()
def last_token_embeddings(pipe: DiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """``[len(prompts), dim]``: each prompt's text embedding at its last token before end-of-text.

    The reference's index ``attention_mask.sum() - 2``: the tokenized prompt holds
    start-of-text, the prompt's tokens and end-of-text, so an empty prompt gives position 0.
    """
    embeddings = encode_prompts(pipe, prompts)
    length = pipe.tokenizer.model_max_length
    last = [len(pipe.tokenizer(p, truncation=True, max_length=length).input_ids) - 2 for p in prompts]
    return embeddings[torch.arange(len(prompts)), torch.tensor(last)]


def closed_form_edit(
    weight: torch.Tensor,
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserve: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """UCE's minimiser ``W'`` for one projection ``weight`` ``[out, dim]``.

    ``erase`` and ``guide`` are ``[n, dim]`` paired embeddings (row i is mapped onto what row
    i of ``guide`` gives under the original ``weight``); ``preserve`` is ``[m, dim]`` (m may be
    0). Solved in float64 on the CPU (a linear solve rather than the reference's explicit
    fp32 inverse, for accuracy; the matrices are at most a few thousand wide) and returned
    in ``weight``'s dtype and device.
    """
    w = weight.detach().cpu().double()
    c, g, p = (x.detach().cpu().double() for x in (erase, guide, preserve))
    targets = g @ w.T  # [n, out]: the guides' keys/values under the original weights
    kept = p @ w.T  # [m, out]
    mat1 = lamb * w + erase_scale * targets.T @ c + preserve_scale * kept.T @ p
    mat2 = lamb * torch.eye(w.shape[1], dtype=w.dtype) + erase_scale * c.T @ c + preserve_scale * p.T @ p
    # mat2 is symmetric, so W' = mat1 · mat2⁻¹ = (mat2⁻¹ · mat1ᵀ)ᵀ.
    return torch.linalg.solve(mat2, mat1.T).T.to(weight.dtype).to(weight.device)


@SD_METHODS.register("uce")
class UCE(SDMethod):
    """Unified concept editing: erase (several) concepts in one closed-form solve, no training."""

    section = "uce"
    closed_form = True

    def trainable(self, name: str) -> bool:
        """The weights UCE changes: every ``attn2.to_k`` / ``attn2.to_v`` (``to_v`` only without ``with_to_k``)."""
        return is_uce_weight(name, self.ctx.config.uce.with_to_k)

    def edit_prompts(self) -> tuple[list[str], list[str], list[str]]:
        """The erased prompts, their guides (paired) and the preserved prompts."""
        cfg, concept = self.ctx.config.uce, self.ctx.concept
        parts = concept.concepts
        guides = [cfg.guide] * len(parts) if isinstance(cfg.guide, str) else list(cfg.guide)
        if len(guides) != len(parts):
            raise ErasureError(
                f"uce.guide lists {len(guides)} guides for {len(parts)} erased concepts ({', '.join(p.name for p in parts)}); "
                "give one guide for all or one per concept."
            )
        erase, guide = [], []
        for part, g in zip(parts, guides):
            for prompt in [part.concept, *(t.format(part.concept) for t in cfg.templates)]:
                erase.append(prompt)
                guide.append(g)
        preserve = concept.retain if cfg.preserve is None else cfg.preserve
        # Each preserved prompt counts as often as it is listed, as the erased ones: the reference's
        # solve loops over its preserve list (its dictionary only caches the embeddings).
        return erase, guide, list(preserve)

    @torch.no_grad()
    def edit(self, model: torch.nn.Module) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.ctx.config.uce
        erase, guide, preserve = self.edit_prompts()
        encoders = family_of(ctx.pipe).text_encoders(ctx.pipe)
        frozen = [encoder.dtype for encoder in encoders]
        for encoder in encoders:
            encoder.float()  # the reference encodes in fp32; the text encoders are small next to the UNet
        try:
            c = last_token_embeddings(ctx.pipe, erase).float()
            g = last_token_embeddings(ctx.pipe, guide).float()
            p = last_token_embeddings(ctx.pipe, preserve).float() if preserve else c.new_zeros(0, c.shape[1])
        finally:
            for encoder, dtype in zip(encoders, frozen):
                encoder.to(dtype)
        edited, erase_error, preserve_drift = 0, [], []
        for name, param in model.named_parameters():
            if not self.trainable(name):
                continue
            new = closed_form_edit(param, c, g, p, cfg.lamb, cfg.erase_scale, cfg.preserve_scale)
            # How well the edit did, relative to where the erased and preserved outputs started.
            w, c_, g_, p_ = (x.detach().double().cpu() for x in (param, c, g, p))
            n_ = new.double().cpu()
            target = g_ @ w.T
            erase_error.append(float((c_ @ n_.T - target).norm() / (c_ @ w.T - target).norm().clamp_min(1e-12)))
            if len(p_):
                preserve_drift.append(float((p_ @ n_.T - p_ @ w.T).norm() / (p_ @ w.T).norm().clamp_min(1e-12)))
            param.copy_(new)
            edited += 1
        if edited == 0:
            raise ErasureError("UCE found no cross-attention (attn2) key/value projections in this UNet.")
        return {
            "uce": {
                "erased": erase,
                "guides": guide,
                "preserved": preserve,
                "edited_matrices": edited,
                # mean over matrices of ‖W'c − Wg‖ / ‖Wc − Wg‖: 0 is a perfect erasure, 1 none
                "erase_residual": sum(erase_error) / edited,
                # mean over matrices of ‖W'p − Wp‖ / ‖Wp‖: how far the preserved outputs moved
                "preserve_drift": sum(preserve_drift) / len(preserve_drift) if preserve_drift else None,
            }
        }
