"""Retrain: train from scratch on the retain set only (the gold standard the table compares with)."""

import torch.nn as nn

from erasure.classification.methods.base import Method, register
from erasure.classification.train import build_model, fit


@register("retrain")
class Retrain(Method):
    def run(self, model: nn.Module) -> nn.Module:
        ctx, recipe = self.ctx, self.ctx.config.retrain
        fresh = build_model(ctx.config, ctx.retain_images.shape[1], ctx.num_classes, recipe.seed).to(ctx.accelerator.device)
        data, val = (ctx.retain_images, ctx.retain_labels), (ctx.val_images, ctx.val_labels)
        sync_bn = ctx.config.sync_batchnorm
        return fit(fresh, *data, recipe, ctx.folder, ctx.accelerator, ctx.fingerprint, desc="retrain", sync_bn=sync_bn, val=val)
