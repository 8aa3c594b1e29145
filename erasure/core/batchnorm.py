"""BatchNorm over the global batch of a multi-process job, as a one-device run normalizes.

Under DDP each process's BatchNorm would see only its shard of a step's batch, so a recipe
(the reference's ResNets train on one GPU) would train differently on N processes.
:func:`synced_batchnorm` switches a model's BatchNorm layers to global-batch statistics
while it trains: ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm2d` elsewhere (gloo).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate import Accelerator


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced (summed) gradient: every process's loss reaches every shard."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the job's processes, differentiable (torch's own differentiable all_reduce is deprecated)."""
    return _SumOverProcesses.apply(x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, normalizes with the statistics of the batch of all processes together.

    torch's ``SyncBatchNorm`` does this on GPUs only; this is the same computation in plain
    ops for CPU (gloo) jobs. Its all-reduces are autograd-aware: the backward pass sums each
    statistic's gradient over processes, as ``SyncBatchNorm``'s does. Mean and variance are
    taken in two passes (mean, then centred squares), in fp32, like BatchNorm's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        x32 = x.float()
        count = torch.full((1,), x.numel() / x.shape[1], device=x.device)
        totals = all_reduce(torch.cat([x32.sum(dims), count]))
        n = totals[-1].detach()
        mean = totals[:-1] / n
        centred = x32 - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / n  # biased, for normalizing (as BatchNorm)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), factor)  # unbiased, as BatchNorm keeps
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


@contextmanager
def synced_batchnorm(model: nn.Module, accelerator: Accelerator, enabled: bool = True) -> Iterator[None]:
    """While training with several processes, make ``model``'s BatchNorm layers use the whole global batch's statistics.

    A one-GPU run (the reference) normalizes each step with the statistics of its whole
    batch; plain DDP would use each process's shard instead, so the same recipe would train
    differently with N. The layers are switched in place (``SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm2d` elsewhere) and switched back on exit: parameters, buffers and
    state-dict keys stay the model's own, so the optimizer, the mask constraint and the
    checkpoints see the same tensors. No-op for one process or when not ``enabled``.
    """
    layers = [m for m in model.modules() if type(m) is nn.BatchNorm2d] if enabled and accelerator.num_processes > 1 else []
    synced = nn.SyncBatchNorm if accelerator.device.type == "cuda" else GlobalBatchNorm2d
    for m in layers:
        m.__class__ = synced
        if synced is nn.SyncBatchNorm:
            m.process_group = None  # the default (world) group; SyncBatchNorm's __init__ would set it
    try:
        yield
    finally:
        for m in layers:
            m.__class__ = nn.BatchNorm2d
