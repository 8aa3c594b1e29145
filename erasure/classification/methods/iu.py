"""IU: influence unlearning, one Newton step with a WoodFisher inverse.

Removing the forget set moves the optimum by about H^-1 (n_f / n) (g_forget - g_retain),
with g the mean loss gradient on each set. H is approximated by the empirical Fisher
F = lambda * I + G^T G / N from N per-sample retain gradients G (N x P), with lambda =
``damping`` times F's mean diagonal entry, and F^-1 v is
computed exactly with the Woodbury identity (what WoodFisher's recursive Sherman-Morrison
computes), in an N x N solve instead of a P x P one.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from erasure.classification.data import seeded_perm, to_input
from erasure.classification.methods.base import Method, register
from erasure.core.errors import ErasureError


def _flat_grad(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed cross-entropy over one batch, as one flat vector."""
    loss = F.cross_entropy(model(to_input(x)), y, reduction="sum")
    return parameters_to_vector(torch.autograd.grad(loss, params))


def _mean_grad(model: nn.Module, params: list[nn.Parameter], images: torch.Tensor, labels: torch.Tensor, batch: int) -> torch.Tensor:
    total = sum(_flat_grad(model, params, images[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch))
    return total / len(labels)


@register("iu")
class InfluenceUnlearning(Method):
    def run(self, model: nn.Module) -> nn.Module:
        ctx, cfg = self.ctx, self.ctx.config.unlearn.iu
        model.eval()  # BatchNorm with its running statistics: a fixed function whose Hessian we approximate
        params = [p for p in model.parameters() if p.requires_grad]
        batch = ctx.config.eval_batch_size
        n_f, n_r = len(ctx.forget_labels), len(ctx.retain_labels)
        g_f = _mean_grad(model, params, ctx.forget_images, ctx.forget_labels, batch)
        g_r = _mean_grad(model, params, ctx.retain_images, ctx.retain_labels, batch)
        v = n_f / (n_f + n_r) * (g_f - g_r)

        pick = seeded_perm(n_r, ctx.config.unlearn.seed)[: cfg.samples].to(ctx.retain_labels.device)
        G = torch.stack([_flat_grad(model, params, ctx.retain_images[i : i + 1], ctx.retain_labels[i : i + 1]) for i in pick])
        n = len(G)
        # Damping relative to the Fisher's mean diagonal, so one value fits any model size or loss scale.
        lam = cfg.damping * float(G.pow(2).sum()) / (n * G.shape[1])
        # F^-1 v = (v - G^T (n * lam * I + G G^T)^-1 G v) / lam
        small = (G @ G.T).double() + n * lam * torch.eye(n, dtype=torch.float64, device=G.device)
        coef = torch.linalg.solve(small, (G @ v).double()).float()
        step = (v - G.T @ coef) / lam
        if not torch.isfinite(step).all() or not torch.isfinite(parameters_to_vector(params) + cfg.alpha * step).all():
            raise ErasureError(f"the IU step is not finite (unlearn.iu.alpha={cfg.alpha}); lower alpha or raise unlearn.iu.damping.")
        with torch.no_grad():
            vector_to_parameters(parameters_to_vector(params) + cfg.alpha * step, params)
        self.info.update(iu_step_norm=float(cfg.alpha * step.norm()), iu_samples=n, iu_lambda=lam)
        return model
