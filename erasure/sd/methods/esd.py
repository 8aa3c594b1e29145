"""ESD (erased stable diffusion): negative guidance away from the concept, data-free.

Each step samples an intermediate latent x_t (DDIM, ``esd.ddim_steps`` steps, guidance
``esd.start_guidance``, stopped at a random step) with the model being trained, as the
original ESD does (``esd.trajectory=frozen``: with the frozen copy, as the newer
``esd_sd.py`` does), and regresses ε(x_t, c) onto ε₀ − η(ε_c − ε₀) of a frozen copy kept
in low precision (``esd.anchor=concept``: onto ε_c − η(ε_c − ε₀), the newer script's
target). Where the trajectory stops and which timestep the UNets are given follow the
original (``esd.timestep=matched``: the newer script's pairing; see the config); the
newer script's PLMS sampler and 1024 px trajectories are ``esd.sampler=pndm`` and
``esd.resolution=1024``. The variants differ only in which weights they train;
``esd.params`` picks the original's parameter sets or the newer script's Linear/Conv-only ones.

Several concepts: each step erases one of their prompts, drawn at random (from the step's
generator, so a resumed run draws the same ones).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cached_property, partial

import torch
import torch.nn.functional as F

from erasure.core.errors import ErasureError
from erasure.core.esd import draw_esd_step
from erasure.core.graphs import GraphedCall
from erasure.core.loop import host_generator
from erasure.sd.methods.base import SD_METHODS, SDMethod, eps, warn_unlike_recipe
from erasure.sd.model import Conditioning, ddim_scheduler, encode_conditioning, frozen_dtype, pndm_scheduler

# Outside cross-attention, the original ESD-u ("noxattn") also leaves out the time
# embedding and the output layers (CompVis names time_embed.* and out.*).
COMPVIS_ESD_U_EXCLUDED = ("time_embedding.", "conv_norm_out.", "conv_out.")

# The reference recipes' training settings, which the `train:` section of a run config must
# set for ESD (the schema's defaults are SalUn's): train-esd.py, and esd_sd.py (esd.anchor=concept).
ESD_RECIPES = {
    "uncond": (
        "configs/sd/nudity_esd.yaml",
        {"steps": 1000, "batch_size": 1, "lr": 1e-5, "weight_decay": 0.0, "grad_clip": None, "weights_dtype": "fp32"},
    ),
    "concept": (
        "configs/sd/nudity_esd_diffusers.yaml",
        {"steps": 200, "batch_size": 1, "lr": 5e-5, "weight_decay": 0.0, "grad_clip": None, "weights_dtype": "bf16"},
    ),
}


class ESD(SDMethod):
    """Shared by every variant."""

    section = "esd"

    def trainable(self, name: str) -> bool:
        if self.ctx.config.esd.params == "linear" and name not in self.linear_params:
            return False  # esd_sd.py trains only Linear and Conv2d weights (no norms)
        return self.selects(name)

    def selects(self, name: str) -> bool:
        """The variant's own choice among the candidate weights."""
        return True

    @cached_property
    def linear_params(self) -> set[str]:
        """Names of the UNet's Linear and Conv2d parameters."""
        return {
            f"{module_name}.{n}"
            for module_name, module in self.ctx.pipe.unet.named_modules()
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
            for n, _ in module.named_parameters(recurse=False)
        }

    def prepare(self, model: torch.nn.Module) -> None:
        ctx, cfg = self.ctx, self.ctx.config.esd
        if cfg.sampler == "pndm" and cfg.timestep != "matched":
            raise ErasureError(
                "esd.sampler=pndm needs esd.timestep=matched (esd_sd.py's pairing); "
                "the original pairing (esd.timestep=original) is defined on train-esd.py's DDIM grid."
            )
        recipe, values = ESD_RECIPES[cfg.anchor]
        warn_unlike_recipe(ctx.config.method, ctx.config.train, recipe, values)
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval()
        self.teacher.to(dtype=frozen_dtype(ctx.config.model.frozen_dtype, ctx.device))
        prompts = [part.concept for part in ctx.concept.concepts]
        if cfg.resolution is None:
            self.latent_size = ctx.pipe.unet.config.sample_size
            self.concepts, self.uncond = ctx.encode(prompts), ctx.uncond  # K rows; one row
        else:
            self.latent_size = cfg.resolution // ctx.pipe.vae_scale_factor
            # SDXL's size conditioning follows the trajectory's size.
            emb = encode_conditioning(ctx.pipe, ["", *prompts], cfg.resolution).float().to(ctx.device)
            self.uncond, self.concepts = emb[:1], emb[1:]
        self.sampler = pndm_scheduler(ctx.pipe) if cfg.sampler == "pndm" else ddim_scheduler(ctx.pipe)
        self.sampler.set_timesteps(cfg.ddim_steps, device=ctx.device)
        self.timesteps = self.sampler.timesteps.tolist()  # read on the host each step, so kept there
        self.graphed: GraphedCall | None = None  # the trajectory's UNet call, with esd.cuda_graph

    def _denoiser(self, model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
        """``eps`` of ``model`` (the trajectory's, the same one every step), through a CUDA graph with ``esd.cuda_graph``."""
        if not self.ctx.config.esd.cuda_graph:
            return partial(eps, model)
        if self.graphed is None:
            net = getattr(model, "module", model)  # the UNet itself: a DDP wrapper's forward could synchronise
            keys = list(self.ctx.uncond.added)  # the family's extra inputs (SDXL's), passed as tensors
            # forward, not __call__: the eager UNet even when train.compile has compiled __call__

            def call(x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, *added: torch.Tensor) -> torch.Tensor:
                return eps(net.forward, x, t, Conditioning(hidden, dict(zip(keys, added))))

            self.graphed = GraphedCall(call, "esd.cuda_graph", watch=net)
        return lambda x, t, emb: self.graphed(x, t, emb.hidden, *emb.added.values())

    @torch.no_grad()
    def _trajectory(self, model: torch.nn.Module, concept: Conditioning, stop: int, n: int, g: torch.Generator) -> torch.Tensor:
        """x_t after ``stop`` steps of ``esd.sampler`` (DDIM or PLMS) from pure noise, guided towards ``concept`` (its conditioning)."""
        ctx, w = self.ctx, self.ctx.config.esd.start_guidance
        size = self.latent_size
        x = torch.randn((n, ctx.pipe.unet.config.in_channels, size, size), generator=g, device=g.device).to(ctx.device)
        # The frozen teacher runs in low precision; the trained model takes fp32 inputs (autocast casts them where it computes in bf16).
        dtype = next(self.teacher.parameters()).dtype if model is self.teacher else torch.float32
        emb = Conditioning.cat([self.uncond.expand(n), concept.expand(n)]).to(dtype)
        denoise = self._denoiser(model)
        if self.ctx.config.esd.sampler == "pndm":
            # PLMS keeps the previous steps' predictions: every trajectory starts it afresh, as each pipeline call does.
            self.sampler.set_timesteps(self.ctx.config.esd.ddim_steps, device=ctx.device)
        # Host-side timesteps: a scheduler indexing its CPU tables with a CUDA tensor would wait for the GPU every step.
        for t in self.timesteps[:stop]:
            uncond, cond = denoise(torch.cat([x, x]).to(dtype), torch.full((2 * n,), t, device=ctx.device), emb).float().chunk(2)
            x = self.sampler.step(uncond + w * (cond - uncond), t, x).prev_sample
        return x

    def target(self, e0: torch.Tensor, ec: torch.Tensor) -> torch.Tensor:
        """The regression target from the frozen copy's ε₀ (empty prompt) and ε_c (concept), per ``esd.anchor``.

        "uncond" (train-esd.py): ε₀ − η(ε_c − ε₀). "concept" (esd_sd.py, ``noise_pred_erase_from``
        = ε_c without ``--erase_from``): ε_c − η(ε_c − ε₀).
        """
        cfg = self.ctx.config.esd
        return (ec if cfg.anchor == "concept" else e0) - cfg.eta * (ec - e0)

    def draw_step(self, host: torch.Generator) -> tuple[int, int]:
        """How many DDIM steps the trajectory runs, and the timestep the UNets then get (``esd.timestep``)."""
        cfg = self.ctx.config.esd
        train_steps = self.ctx.scheduler.config.num_train_timesteps
        return draw_esd_step(host, cfg.ddim_steps, train_steps, self.timesteps, cfg.timestep)

    def loss(self, model: torch.nn.Module, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        ctx, n = self.ctx, self.ctx.config.train.batch_size
        # One concept per step; with a single concept nothing is drawn, so its runs are unchanged.
        host = host_generator(g)
        k = int(torch.randint(0, len(self.concepts), (1,), generator=host)) if len(self.concepts) > 1 else 0
        concept = self.concepts[k : k + 1]
        stop, timestep = self.draw_step(host)
        x_t = self._trajectory(model if ctx.config.esd.trajectory == "trained" else self.teacher, concept, stop, n, g)
        t = torch.full((n,), timestep, device=ctx.device)
        with torch.no_grad():
            dtype = next(self.teacher.parameters()).dtype
            emb = Conditioning.cat([self.uncond, concept]).repeat_interleave(n).to(dtype)
            e0, ec = eps(self.teacher, torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]), emb).float().chunk(2)
        target = self.target(e0, ec)
        loss = F.mse_loss(eps(model, x_t, t, concept.expand(n)).float(), target)
        logs = {"stop": float(stop), "timestep": float(timestep), **({"concept": float(k)} if len(self.concepts) > 1 else {})}
        return loss, logs


@SD_METHODS.register("esd-x")
class ESDX(ESD):
    """Cross-attention only: erases what the prompt's words do (e.g. a style)."""

    def selects(self, name: str) -> bool:
        return ".attn2." in name


@SD_METHODS.register("esd-u")
class ESDU(ESD):
    """Everything except cross-attention: erases the concept however it is prompted.

    With ``esd.params=compvis`` (the default) the time embedding and the output norm and
    conv stay frozen too, as in the original; norms inside the blocks are trained.
    """

    def selects(self, name: str) -> bool:
        if ".attn2." in name:
            return False
        return self.ctx.config.esd.params != "compvis" or not name.startswith(COMPVIS_ESD_U_EXCLUDED)


@SD_METHODS.register("esd-all")
class ESDAll(ESD):
    """Every UNet weight (``esd.params=linear``: every Linear and Conv2d weight)."""


@SD_METHODS.register("esd-x-strict")
class ESDXStrict(ESD):
    """Only the key and value projections of cross-attention (what reads the text)."""

    def selects(self, name: str) -> bool:
        return ".attn2.to_k." in name or ".attn2.to_v." in name
