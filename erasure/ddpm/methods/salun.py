"""SalUn: RL's objective restricted to the weights most salient for the forgotten class.

Saliency is the summed gradient of the guided denoising loss (summed over the pixels, mean
over the batch) on one shuffled pass over the forget images, each batch's gradient clipped
to norm 1, as the reference's ``generate_mask``; the top ``mask.ratio`` of weights by magnitude may
change, the rest are held fixed by the training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from erasure.core.saliency import Mask, accumulate_gradients
from erasure.ddpm.methods.base import register
from erasure.ddpm.methods.rl import RL
from erasure.ddpm.model import add_noise, guided_eps


@register("salun")
class SalUn(RL):
    """RL on a saliency mask."""

    def make_mask(self, model: torch.nn.Module) -> Mask:
        ctx, cfg = self.ctx, self.ctx.config.mask
        if cfg.path:
            return Mask.load(cfg.path, model)
        g = torch.Generator(device=ctx.forget_images.device).manual_seed(ctx.config.seed + 7919)
        if cfg.batches is None:  # one shuffled pass, as the reference's forget loader
            batches = ctx.in_shuffled_order(ctx.forget_images, cfg.batch_size, g)
        else:  # mask.batches=N: N batches drawn with replacement, each as its turn comes (our earlier draws, bit for bit)
            batches = (ctx.draw(ctx.forget_images, g, cfg.batch_size) for _ in range(cfg.batches))

        def forget_loss(m: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
            x0 = ctx.augment(ctx.forget_images[idx], g)
            x_t, noise, t = add_noise(ctx.scheduler, x0, g, ctx.config.timesteps == "antithetic")
            guided = guided_eps(m, x_t, t, ctx.labels(ctx.forget_class, len(x0)), cfg.guidance, ctx.null_class)
            if cfg.loss_reduction == "sum":  # summed over the pixels, mean over the batch (the reference's)
                return (guided - noise).square().flatten(1).sum(1).mean()
            return F.mse_loss(guided, noise)

        was_training = model.training
        model.eval()
        grads = accumulate_gradients(model, forget_loss, batches, clip_norm=1.0)
        model.train(was_training)
        scores = {n: g.abs() for n, g in grads.items()}
        return Mask.from_scores(
            model,
            scores,
            cfg.ratio,
            cfg.per_layer,
            loss="ddpm-guided-mse",
            guidance=cfg.guidance,
            batches=cfg.batches or len(batches),
            batch_order="random" if cfg.batches else "one-pass",
            loss_reduction=cfg.loss_reduction,
            forget_class=ctx.forget_class,
        )
