"""Where ESD's sampled trajectory stops and which timestep the models are then given.

Shared by ESD on Stable Diffusion and on the class-conditional DDPM, so both pair them the same way.
"""

from __future__ import annotations

import torch


def draw_esd_step(host: torch.Generator, ddim_steps: int, train_steps: int, timesteps: list[int], pairing: str) -> tuple[int, int]:
    """``(DDIM steps to run from pure noise, the timestep the models get at the latent reached)``.

    ``pairing="original"`` (CompVis ``train-esd.py``): ``t_enc ~ U{0..ddim_steps-1}``; its
    sampler stops once its step index + 1 equals ``t_enc``, so it runs
    ``ddim_steps - t_enc + 1`` steps (all of them for ``t_enc`` 0 and 1), and the models
    get a training step drawn in ``[t_enc, t_enc + 1) * train_steps / ddim_steps``.
    ``pairing="matched"`` (``esd_sd.py``): ``k ~ U{0..ddim_steps-1}`` steps, and the DDIM
    timestep the latent is at (``timesteps[k]``, with ``timesteps`` the sampler's, noisiest first).
    """
    k = int(torch.randint(0, ddim_steps, (1,), generator=host))
    if pairing == "matched":
        return k, int(timesteps[k])
    low, high = round(k / ddim_steps * train_steps), round((k + 1) / ddim_steps * train_steps)
    return min(ddim_steps, ddim_steps - k + 1), int(torch.randint(low, high, (1,), generator=host))
