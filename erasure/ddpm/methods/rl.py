"""RL ("relabeling"), the unmasked form of SalUn's objective.

Forget loss: MSE between eps(x_t, c_forget) and the detached eps(x_t, c_target) on
noised forget images, which steers the forgotten class onto a misaligned one.
Retain loss: the standard DDPM loss on the other classes. Both are per-element means,
so ``alpha`` weighs two quantities of the same scale whatever the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from erasure.ddpm.methods.base import Method, register
from erasure.ddpm.model import add_noise, denoising_loss, eps


@register("rl")
class RL(Method):
    """Misaligned-target forgetting plus alpha times the retain loss, on all weights."""

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        ctx = self.ctx
        x0 = ctx.forget_images[ctx.draw(ctx.forget_images, g)]
        x_t, _, t = add_noise(ctx.scheduler, x0, g)
        with torch.no_grad():
            target = eps(model, x_t, t, ctx.labels(ctx.target_class, len(x0)))
        forget = F.mse_loss(eps(model, x_t, t, ctx.labels(ctx.forget_class, len(x0))), target)
        idx = ctx.draw(ctx.retain_images, g)
        retain = denoising_loss(model, ctx.scheduler, ctx.retain_images[idx], ctx.retain_labels[idx], g)
        return forget + ctx.config.alpha * retain, {"forget": forget.item(), "retain": retain.item()}
