"""A no-grad model call replayed as a CUDA graph.

ESD draws each training step's x_t with a sampled DDIM trajectory: 25 denoiser calls on
average, each at a small batch (2 rows at the reference's batch 1, with guidance). At that
size a GPU spends longer launching the UNet's thousand-odd kernels one by one from Python
than running them; a captured graph launches them all at once. The captured calls still
see the weights as they are at each step: the optimizer updates the parameters in place,
and the low-precision casts are captured as kernels rather than served from autocast's
cache, so each replay casts the current weights again. A graph reads the memory it was
captured with: a weight given new storage (``p.data = ...``, a dtype change) would leave it
reading freed memory, so the call watches its module's tensors and captures again then.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from erasure.core.errors import ErasureError


class GraphedCall:
    """``fn(*tensors) -> tensor`` under ``torch.no_grad``, through one CUDA graph per input shape.

    The first call with a new shape (or autocast setting) runs ``fn`` twice on a side
    stream (library handles and workspaces are created outside the capture), then captures
    it; later calls copy their inputs into the captured buffers and replay. ``fn`` must be
    capturable: no host synchronisation, no CPU tensors, no data-dependent shapes. On a
    CPU it is simply called. ``watch`` is the module whose parameters and buffers ``fn``
    reads: when any of them moves to new storage, every graph is captured again.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], option: str = "cuda_graph", watch: torch.nn.Module | None = None) -> None:
        self.fn = fn
        self.option = option  # the setting that asked for graphs, named in the error if capture fails
        self.watched = [*watch.parameters(), *watch.buffers()] if watch is not None else []
        self.storage: list[int] = []  # the watched tensors' addresses when the graphs were captured
        self.graphs: dict[tuple, tuple[list[torch.Tensor], torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        device = inputs[0].device
        if device.type != "cuda":
            return self.fn(*inputs)
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        key = (autocast, *((tuple(x.shape), x.dtype, x.device) for x in inputs))
        storage = [t.data_ptr() for t in self.watched]  # ~45 us for 700 tensors on a CPU core, against a call's milliseconds
        if storage != self.storage:
            self.graphs.clear()  # they read the old storage, which may be freed and reused by now
            self.storage = storage
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs, *autocast)
        static, graph, out = self.graphs[key]
        for buffer, x in zip(static, inputs):
            buffer.copy_(x)
        graph.replay()
        return out.clone()  # the next replay overwrites the captured output

    def _capture(self, inputs: tuple[torch.Tensor, ...], autocast: bool, dtype: torch.dtype) -> tuple:
        static = [x.clone() for x in inputs]

        def run() -> torch.Tensor:
            # cache_enabled=False: a cached cast would freeze the weights as they were at capture.
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
                return self.fn(*static)

        side = torch.cuda.Stream(static[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = run()
        except RuntimeError as e:  # an op that synchronises or allocates on the host cannot be captured
            raise ErasureError(f"{self.option}: the call could not be captured as a CUDA graph ({e}); set {self.option}=false.") from e
        return static, graph, out
