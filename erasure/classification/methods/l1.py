"""l1-sparse: FT on the retain set plus gamma * ||theta||_1, gamma decaying linearly over the epochs."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import Method, register


@register("l1")
class L1Sparse(Method):
    def run(self, model: nn.Module) -> nn.Module:
        cfg = self.ctx.config.unlearn.l1

        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
            gamma = cfg.gamma * (1 - epoch / cfg.epochs)  # constant within an epoch, as in the reference
            ce = F.cross_entropy(model(x), y)
            l1 = sum(p.abs().sum() for p in model.parameters())
            return ce + gamma * l1, {"gamma": gamma}  # no .item() here: it would sync the GPU every step

        return self.ctx.fit(model, self.ctx.retain_images, self.ctx.retain_labels, cfg.epochs, cfg.lr, loss, desc="l1")
