"""RL: train on the forget set with random labels together with the retain set."""

import torch
import torch.nn as nn

from erasure.classification.methods.base import Method, UnlearnContext, register


def relabeled(ctx: UnlearnContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Forget images with random wrong labels, then the retain set: one shuffled training set."""
    images = torch.cat([ctx.forget_images, ctx.retain_images])
    labels = torch.cat([ctx.random_labels(ctx.forget_labels), ctx.retain_labels])
    return images, labels


@register("rl")
class RandomLabel(Method):
    def run(self, model: nn.Module) -> nn.Module:
        cfg = self.ctx.config.unlearn.rl
        return self.ctx.fit(model, *relabeled(self.ctx), cfg.epochs, cfg.lr, desc="rl")
