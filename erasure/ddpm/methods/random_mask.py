"""The random-mask ablation: RL on a uniformly random mask with SalUn's ratio.

If this erases as well as SalUn while keeping quality, saliency would not matter.
"""

from __future__ import annotations

import torch

from erasure.core.saliency import Mask
from erasure.ddpm.methods.base import register
from erasure.ddpm.methods.rl import RL


@register("random")
class RandomMask(RL):
    """RL on a random mask."""

    def make_mask(self, model: torch.nn.Module) -> Mask:
        cfg = self.ctx.config
        return Mask.random(model, cfg.mask.ratio, seed=cfg.seed, per_layer=cfg.mask.per_layer)
