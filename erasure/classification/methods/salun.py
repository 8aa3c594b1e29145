"""SalUn: RL restricted, as a hard constraint, to the weights most salient to the forget set.

Saliency is |sum over forget batches of the gradient of -CE| (no per-batch clipping, as in
the reference classifier code), thresholded globally to the top ``ratio`` of weights.
Training is RL's schedule (by default: each epoch a forget pass with labels redrawn per
batch, then a retain pass); after every optimizer step the masked-out weights are
restored and their momentum zeroed (:class:`erasure.core.saliency.MaskConstraint`), as the
reference's current ``RL.py`` does. ``mask_mode: gradient`` masks only the gradients, as its
earlier versions did: SGD's weight decay then still shrinks the masked-out weights.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from erasure.classification.data import augment, to_input
from erasure.classification.methods.base import Method, register
from erasure.classification.methods.rl import rl_passes
from erasure.core.data import seeded_perm
from erasure.core.saliency import Mask, accumulate_gradients
from erasure.core.stages import Stage, shared_mask


@register("salun")
class SalUn(Method):
    def make_mask(self, model: nn.Module) -> Mask:
        """The saliency mask of ``model`` (eval mode, so BatchNorm statistics stay as they are)."""
        ctx, cfg = self.ctx, self.ctx.config.unlearn.salun
        size = ctx.config.unlearn.batch_size
        # Batches of a seeded shuffle, as the reference's shuffled forget loader (the smaller last batch weighs more per image).
        order = seeded_perm(len(ctx.forget_labels), ctx.config.unlearn.seed).to(ctx.forget_labels.device)
        parts = [order[i : i + size] for i in range(0, len(order), size)]
        batches = [(ctx.forget_images[part], ctx.forget_labels[part]) for part in parts]

        # The reference's forget loader applies the training transform, so by default the
        # saliency is taken on crops and flips whenever unlearning augments (seeded, one draw per batch).
        g = torch.Generator(ctx.forget_images.device).manual_seed(ctx.config.unlearn.seed)
        augmented = cfg.mask_augment and ctx.config.unlearn.augment

        def forget_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return -F.cross_entropy(model(to_input(augment(x, g) if augmented else x)), y)

        model.eval()
        grads = accumulate_gradients(model, forget_loss, batches, clip_norm=None, progress=False)
        scores = {n: g.abs() for n, g in grads.items()}
        info = {"loss": "classifier-neg-ce", "batches": len(batches), "augmented": augmented}
        return Mask.from_scores(model, scores, cfg.ratio, cfg.per_layer, **info)

    def run(self, model: nn.Module) -> nn.Module:
        ctx, cfg = self.ctx, self.ctx.config.unlearn.salun
        mask = shared_mask(Stage(ctx.folder, ctx.fingerprint), ctx.accelerator, model, lambda: self.make_mask(model))
        self.info["mask_kept_fraction"] = mask.kept_fraction
        hold = cfg.mask_mode == "hard"
        return ctx.fit_passes(model, rl_passes(ctx, cfg.schedule), cfg.epochs, cfg.lr, mask=mask, desc="salun", mask_hold=hold)
