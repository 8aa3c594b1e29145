"""ESD adapted to class conditioning: negative guidance against the null class.

A frozen copy of the base model gives the target
``eps0(x_t, null) - eta * (eps0(x_t, c) - eps0(x_t, null))`` and the trained model's
``eps(x_t, c)`` regresses onto it. As in ESD, no data is used: x_t comes from a guided
DDIM trajectory for class c, stopped at a random step, drawn by the model being trained
(as in the original ESD and the SalUn DDPM script; ``unlearn.esd_trajectory=frozen`` draws
it with the frozen base instead, as the newer diffusers ESD does). Where it stops and the
timestep the models get pair as in the original ESD (``unlearn.esd_timestep=matched``: as
``esd_sd.py``; see :mod:`erasure.core.esd`). The prediction and the targets use the plain
class and null labels: ESD takes no condition dropout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from erasure.core.esd import draw_esd_step
from erasure.core.graphs import GraphedCall
from erasure.core.loop import host_generator
from erasure.ddpm.methods.base import Method, register
from erasure.ddpm.model import eps, eps_of_batches, guided_eps


@register("esd")
class ESD(Method):
    """Erased Stable Diffusion's objective on a class-conditional DDPM."""

    def prepare(self, model: torch.nn.Module) -> None:
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        self.ddim = DDIMScheduler(num_train_timesteps=self.ctx.scheduler.config.num_train_timesteps, clip_sample=False)
        self.ddim.set_timesteps(self.ctx.config.esd_ddim_steps)
        self.timesteps = self.ddim.timesteps.tolist()  # read on the host each step, so kept there
        self.graphed: GraphedCall | None = None  # the trajectory's guided call, with unlearn.esd_cuda_graph

    def _guided(self, model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The trajectory's guided prediction by ``model`` (the same one every step); a CUDA graph with ``unlearn.esd_cuda_graph``."""
        w, null = self.ctx.config.esd_guidance, self.ctx.null_class
        if not self.ctx.config.esd_cuda_graph:
            return lambda x, t, c: guided_eps(model, x, t, c, w, null)
        if self.graphed is None:
            net = getattr(model, "module", model)  # the UNet itself: a DDP wrapper's forward could synchronise
            self.graphed = GraphedCall(lambda x, t, c: guided_eps(net.forward, x, t, c, w, null), "unlearn.esd_cuda_graph", watch=net)
        return self.graphed

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        ctx = self.ctx
        n = ctx.config.batch_size
        device = ctx.forget_images.device
        c = ctx.labels(ctx.forget_class, n)
        train_steps = ctx.scheduler.config.num_train_timesteps
        stop, timestep = draw_esd_step(host_generator(g), len(self.timesteps), train_steps, self.timesteps, ctx.config.esd_timestep)
        with torch.no_grad():
            x = torch.randn((n, *ctx.forget_images.shape[1:]), generator=g, device=device)
            guided = self._guided(model if ctx.config.esd_trajectory == "trained" else self.frozen)
            for t in self.timesteps[:stop]:
                # A fill on the device: a host tensor copied over would make the host wait for the GPU every step.
                x = self.ddim.step(guided(x, torch.full((n,), t, device=device), c), t, x).prev_sample
            t = torch.full((n,), timestep, device=device)
            e_null, e_cond = eps_of_batches(self.frozen, (x, t, ctx.labels(ctx.null_class, n)), (x, t, c))
            target = e_null - ctx.config.esd_eta * (e_cond - e_null)
        loss = F.mse_loss(eps(model, x, t, c), target)
        return loss, {"stop_step": float(stop), "timestep": float(timestep)}
