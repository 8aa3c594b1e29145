"""GA (gradient ascent), the simplest baseline of the reference ``saliency_unlearn``.

Forget loss: the negated DDPM loss on the forgotten class (labels dropped to the null class
at ``unlearn.forget_cond_drop``, as the reference's conditional loss does by default).
Retain loss: RL's, weighted by ``unlearn.ga_alpha``. Ascent is unbounded, so GA needs few steps or a small learning rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from erasure.ddpm.methods.base import register
from erasure.ddpm.methods.rl import RL
from erasure.ddpm.model import add_noise, eps_of_batches


@register("ga")
class GA(RL):
    """Gradient ascent on the forget class plus ``ga_alpha`` times the retain loss.

    The reference's two GA terms share one reduction (each summed over the pixels), so its
    ``--alpha`` is our ``unlearn.ga_alpha`` as it stands; RL and SalUn's ``unlearn.alpha`` is rescaled.
    """

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        ctx, cfg = self.ctx, self.ctx.config
        x0 = ctx.augment(ctx.forget_images[ctx.batch("forget", g)], g)
        labels = ctx.drop(ctx.labels(ctx.forget_class, len(x0)), cfg.forget_cond_drop, g)
        x_t, noise, t = add_noise(ctx.scheduler, x0, g, cfg.timesteps == "antithetic")
        retain_x_t, retain_noise, retain_t, retain_labels = self.retain_batch(g)
        pred, retain_pred = eps_of_batches(model, (x_t, t, labels), (retain_x_t, retain_t, retain_labels))
        forget = -F.mse_loss(pred, noise)
        retain = F.mse_loss(retain_pred, retain_noise)
        return forget + cfg.ga_alpha * retain, {"forget": forget.detach(), "retain": retain.detach()}
