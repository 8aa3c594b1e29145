"""SalUn for Stable Diffusion: steer the forget prompt to the target, on salient weights only.

Mask: the summed gradient of -MSE(noise, (1+w)·ε_cond − w·ε_uncond) over one pass of the
forget latents in order (w = mask.guidance; no clipping unless ``mask.clip_norm``; random
batches with ``mask.batches``); the top ``mask.ratio`` may change.
Loss: MSE(ε(x_t, c_forget), sg ε(x_t', c_target)) on forget latents, plus alpha times
the standard denoising loss on retain latents with their own prompts; x_t' noises a second
posterior sample of the same images with the same noise and t (``train.latents=sample``, the
reference's two ``get_input`` calls; x_t' = x_t under ``mean``). The forget set is read
in order, one pass per epoch, the retain set beside it (``train.data_order``, see
:class:`~erasure.sd.methods.base.EpochOrder`).

Several concepts: the forget set is their union and one mask is made from it; each forget
latent is steered to a target prompt of its own concept (drawn uniformly among them).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from erasure.core.saliency import Mask, accumulate_gradients
from erasure.sd.methods.base import SD_METHODS, EpochOrder, SDMethod, eps, eps_of_batches
from erasure.sd.model import Conditioning


@SD_METHODS.register("salun")
class SalUnSD(SDMethod):
    """Saliency-masked misaligned-target fine-tuning."""

    section = "mask"
    needs = ("forget", "retain")

    def make_mask(self, model: torch.nn.Module) -> Mask:
        ctx, cfg = self.ctx, self.ctx.config.mask
        if cfg.path:
            return Mask.load(cfg.path, model)
        g = torch.Generator(ctx.device).manual_seed(ctx.config.train.seed + 7919)
        forget = ctx.sets["forget"]
        # None: one pass in dataset order (the reference); an int: that many random batches.
        batches = forget.in_order(cfg.batch_size) if cfg.batches is None else [None] * cfg.batches
        grads = accumulate_gradients(model, lambda m, idx: self.saliency_loss(m, g, idx), batches, clip_norm=cfg.clip_norm)
        scores = {n: v.abs() for n, v in grads.items()}
        info = {
            "loss": "sd-guided-mse",
            "guidance": cfg.guidance,
            "batches": len(batches),
            "order": "one pass" if cfg.batches is None else "random",
            "clip_norm": cfg.clip_norm,
            "concept": ctx.concept.name,
        }
        return Mask.from_scores(model, scores, cfg.ratio, cfg.per_layer, **info)

    def saliency_loss(self, model: torch.nn.Module, g: torch.Generator, idx: torch.Tensor | None = None) -> torch.Tensor:
        """-MSE(target, guided prediction) on forget latents ``idx`` (None: a random batch); the target is the noise for SD 1.x."""
        ctx, w = self.ctx, self.ctx.config.mask.guidance
        forget = ctx.sets["forget"]
        latents, emb, _ = forget.batch(g, ctx.config.mask.batch_size) if idx is None else forget.take(idx, g)
        x_t, target, t = ctx.noisy(latents, g)
        both = eps(model, torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([emb, ctx.uncond.expand(len(emb))]))
        cond, uncond = both.chunk(2)
        return -F.mse_loss(target.float(), ((1 + w) * cond - w * uncond).float())

    def prepare(self, model: torch.nn.Module) -> None:
        concept = self.ctx.concept
        self.target = self.ctx.encode(concept.target)  # T rows
        # Target prompts of each concept, and the concept of each forget prompt.
        parts = torch.tensor(concept.part_of("target"))
        targets_of = [torch.nonzero(parts == k).flatten() for k in range(len(concept.concepts))]
        # The target prompts grouped by concept, with each concept's start and count there:
        # the draw below stays on the device (reading indices back would stall the GPU every step).
        device = self.ctx.device
        self.targets_by_concept = torch.cat(targets_of).to(device)
        self.target_count = torch.tensor([len(t) for t in targets_of], device=device)
        self.target_start = torch.cumsum(self.target_count, 0) - self.target_count
        self.part_of_forget = torch.tensor(concept.part_of("forget"), device=device)
        # One draw in [0, L) per item, L a multiple of every concept's target count, picks
        # uniformly within the item's concept; with one concept, L = T and the draw is the old one.
        self.draw_range = math.lcm(*(len(t) for t in targets_of))

    @functools.cached_property
    def order(self) -> EpochOrder:
        """Which forget and retain items each step reads under ``train.data_order=epochs``."""
        ctx, train = self.ctx, self.ctx.config.train
        sizes = len(ctx.sets["forget"]), len(ctx.sets["retain"])
        return EpochOrder(*sizes, train.batch_size, ctx.process, ctx.processes, train.seed)

    def target_indices(self, prompt_index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """For forget prompts ``prompt_index``, random indices into the target prompts of the same concept."""
        draw = torch.randint(0, self.draw_range, (len(prompt_index),), generator=g, device=g.device).to(self.target.device)
        parts = self.part_of_forget[prompt_index.to(self.target.device)]
        return self.targets_by_concept[self.target_start[parts] + draw % self.target_count[parts]]

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        ctx, n = self.ctx, self.ctx.config.train.batch_size
        forget, retain = ctx.sets["forget"], ctx.sets["retain"]
        in_epochs = ctx.config.train.data_order == "epochs"
        idx = self.order.forget_indices(self.step, ctx.device) if in_epochs else forget.random_indices(g, n)
        latents, emb, p = forget.take(idx, g)
        # The reference encodes the images again for the target's input: under train.latents=sample
        # a second posterior sample, noised with the same noise at the same t (the same mean under "mean").
        target_latents = forget.sample(idx, g)
        noise, t = ctx.noise(latents, g)
        x_t, target_x_t = (ctx.scheduler.add_noise(z, noise, t) for z in (latents, target_latents))
        target_emb = self.target[self.target_indices(p, g)]
        with torch.no_grad():
            target = eps(model, target_x_t, t, target_emb)
        retain_idx = self.order.retain_indices(self.step, ctx.device) if in_epochs else retain.random_indices(g, n)
        retain_latents, retain_emb, _ = retain.take(retain_idx, g)
        retain_x_t, retain_target, retain_t = ctx.noisy(retain_latents, g)
        # Both trained predictions in one UNet call (see eps_of_batches); the losses are the reference's two.
        pred, retain_pred = eps_of_batches(model, (x_t, t, emb), (retain_x_t, retain_t, retain_emb))
        forget = F.mse_loss(pred.float(), target.float())
        retain = F.mse_loss(retain_pred.float(), retain_target.float())
        return forget + ctx.config.train.alpha * retain, {"forget": forget.detach(), "retain": retain.detach()}
