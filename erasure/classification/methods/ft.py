"""FT: fine-tune the original model on the retain set (catastrophic forgetting of the rest)."""

import torch.nn as nn

from erasure.classification.methods.base import Method, register


@register("ft")
class FineTune(Method):
    def run(self, model: nn.Module) -> nn.Module:
        cfg = self.ctx.config.unlearn.ft
        return self.ctx.fit(model, self.ctx.retain_images, self.ctx.retain_labels, cfg.epochs, cfg.lr, desc="ft")
