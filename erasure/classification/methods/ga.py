"""GA: gradient ascent on the forget set (minimize -CE)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import Method, register


def negative_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
    """-CE: descending it ascends the forget loss."""
    return -F.cross_entropy(model(x), y), {}


@register("ga")
class GradientAscent(Method):
    def run(self, model: nn.Module) -> nn.Module:
        cfg = self.ctx.config.unlearn.ga
        return self.ctx.fit(model, self.ctx.forget_images, self.ctx.forget_labels, cfg.epochs, cfg.lr, negative_ce, desc="ga")
