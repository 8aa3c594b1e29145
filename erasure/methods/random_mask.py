"""The random-mask ablation: RL on a uniformly random mask with SalUn's ratio.

If this erases as well as SalUn while keeping quality, saliency would not matter.
"""

from __future__ import annotations

import torch

from erasure.methods.base import register
from erasure.methods.rl import RL
from erasure.saliency import Mask


@register("random")
class RandomMask(RL):
    """RL on a random mask."""

    def make_mask(self, model: torch.nn.Module) -> Mask:
        cfg = self.ctx.config
        return Mask.random(model, cfg.mask.ratio, seed=cfg.seed, per_layer=cfg.mask.per_layer)
