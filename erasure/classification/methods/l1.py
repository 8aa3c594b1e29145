"""l1-sparse: FT on the retain set plus gamma * ||theta||_1, gamma decaying linearly over the epochs.

The schedule is the reference's: in epoch e of E, gamma_e = gamma * (1 - e / (E - no_l1_epochs))
while e < E - no_l1_epochs and 0 after, constant within an epoch. ||theta||_1 sums every
trainable parameter (BatchNorm's included), as the reference's ``l1_regularization`` does.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.methods.base import Method, register


def l1_gamma(gamma: float, epoch: int, epochs: int, no_l1_epochs: int = 0) -> float:
    """The l1 weight of ``epoch`` (0-based): linear decay over the first ``epochs - no_l1_epochs`` epochs, then 0."""
    active = epochs - no_l1_epochs
    return gamma * (1 - epoch / active) if epoch < active else 0.0


@register("l1")
class L1Sparse(Method):
    def run(self, model: nn.Module) -> nn.Module:
        cfg = self.ctx.config.unlearn.l1

        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
            gamma = l1_gamma(cfg.gamma, epoch, cfg.epochs, cfg.no_l1_epochs)
            ce = F.cross_entropy(model(x), y)
            l1 = sum(p.abs().sum() for p in model.parameters())
            return ce + gamma * l1, {"gamma": gamma}  # no .item() here: it would sync the GPU every step

        return self.ctx.fit(model, self.ctx.retain_images, self.ctx.retain_labels, cfg.epochs, cfg.lr, loss, desc="l1")
