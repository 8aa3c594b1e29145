"""RL ("relabeling"), the unmasked form of SalUn's objective.

Forget loss: MSE between eps(x_t, c_forget) and the detached eps(x_t, c_target) on
noised forget images, which steers the forgotten class onto a misaligned one.
Retain loss: the standard DDPM loss on the other classes. Both are per-element means,
so ``alpha`` weighs two quantities of the same scale whatever the image size.

As in the reference ``saliency_unlearn``, labels are dropped to the null class at the
configured rates (``unlearn.retain_cond_drop`` and ``unlearn.forget_cond_drop``, 10% each),
so the unconditional branch that guidance relies on keeps being trained on retained data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from erasure.ddpm.methods.base import Method, register
from erasure.ddpm.model import add_noise, denoising_loss, eps


@register("rl")
class RL(Method):
    """Misaligned-target forgetting plus alpha times the retain loss, on all weights."""

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        ctx, cfg = self.ctx, self.ctx.config
        x0 = ctx.forget_images[ctx.draw(ctx.forget_images, g)]
        x_t, _, t = add_noise(ctx.scheduler, x0, g, cfg.timesteps == "antithetic")
        n = len(x0)
        # The reference draws the dropout separately for the target and the prediction.
        with torch.no_grad():
            target = eps(model, x_t, t, ctx.drop(ctx.labels(ctx.target_class, n), cfg.forget_cond_drop, g))
        forget = F.mse_loss(eps(model, x_t, t, ctx.drop(ctx.labels(ctx.forget_class, n), cfg.forget_cond_drop, g)), target)
        retain = self.retain_loss(model, g)
        return forget + cfg.alpha * retain, {"forget": forget.detach(), "retain": retain.detach()}

    def retain_loss(self, model: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
        """The standard DDPM loss on a retain batch, labels dropped at ``retain_cond_drop``."""
        ctx = self.ctx
        idx = ctx.draw(ctx.retain_images, g)
        labels = ctx.drop(ctx.retain_labels[idx], ctx.config.retain_cond_drop, g)
        return denoising_loss(model, ctx.scheduler, ctx.retain_images[idx], labels, g, ctx.config.timesteps == "antithetic")
