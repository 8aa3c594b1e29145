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
from erasure.ddpm.model import add_noise, eps, eps_of_batches


@register("rl")
class RL(Method):
    """Misaligned-target forgetting plus alpha times the retain loss, on all weights."""

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        ctx, cfg = self.ctx, self.ctx.config
        x0 = ctx.augment(ctx.forget_images[ctx.batch("forget", g)], g)
        x_t, _, t = add_noise(ctx.scheduler, x0, g, cfg.timesteps == "antithetic")
        n = len(x0)
        # The reference draws the dropout separately for the target and the prediction.
        target_labels = ctx.drop(ctx.labels(ctx.target_class, n), cfg.forget_cond_drop, g)
        forget_labels = ctx.drop(ctx.labels(ctx.forget_class, n), cfg.forget_cond_drop, g)
        retain_x_t, retain_noise, retain_t, retain_labels = self.retain_batch(g)
        with torch.no_grad():
            target = eps(model, x_t, t, target_labels)
        # Both trained predictions in one UNet call (see eps_of_batches); the losses are the reference's two.
        pred, retain_pred = eps_of_batches(model, (x_t, t, forget_labels), (retain_x_t, retain_t, retain_labels))
        forget = F.mse_loss(pred, target)
        retain = F.mse_loss(retain_pred, retain_noise)
        return forget + cfg.alpha * retain, {"forget": forget.detach(), "retain": retain.detach()}

    def retain_batch(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, noise, t, labels)`` of a noised retain batch for the standard DDPM loss, labels dropped at ``retain_cond_drop``."""
        ctx = self.ctx
        idx = ctx.batch("retain", g)
        labels = ctx.drop(ctx.retain_labels[idx], ctx.config.retain_cond_drop, g)
        x_t, noise, t = add_noise(ctx.scheduler, ctx.augment(ctx.retain_images[idx], g), g, ctx.config.timesteps == "antithetic")
        return x_t, noise, t, labels
