"""The one training loop: base DDPM, classifier and every erasure method run through it.

A caller supplies ``step_loss(model, generator, step) -> (loss, logs)``. The loop owns
everything else: accelerate (devices, DDP, mixed precision), the optimizer and learning
rate schedule, gradient clipping, the mask constraint, EMA, CSV logging, progress, and
checkpoints. Randomness comes from a generator seeded by (seed, step, process), so a
resumed run draws exactly the batches and noise the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, parse_flag_from_env
from tqdm.auto import tqdm

from erasure.core.errors import ErasureError
from erasure.core.io import load_checkpoint, save_checkpoint
from erasure.core.saliency import MaskConstraint
from erasure.core.stages import any_process
from erasure.core.tracking import TrackerRun, parse_log_with

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


class Monitor:
    """Watches a run after every step and keeps its own state in the run's checkpoints.

    The classification path keeps the weights of the epoch with the best validation
    accuracy this way (:class:`erasure.classification.train.BestOnValidation`): what it
    holds at a checkpoint is what it held at that step, so a resumed run ends as the
    uninterrupted one would.
    """

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Called with the unwrapped model after ``step`` optimizer steps (1-based), before any checkpoint of that step."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able values to keep in the checkpoint."""
        return {}, {}

    def postfix(self) -> dict[str, str]:
        """What to show beside the loss in the progress bar (a run stopped early has told it)."""
        return {}

    def load(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Restore what :meth:`state` returned, from a checkpoint being resumed."""


# A step's loss and the numbers worth logging (floats, or 0-d tensors read only on logged steps).
StepLoss = Callable[[torch.nn.Module, torch.Generator, int], tuple[torch.Tensor, dict[str, float | torch.Tensor]]]


@dataclass
class LoopSettings:
    """How to optimize; the loss itself comes from the caller."""

    steps: int
    lr: float
    seed: int = 0
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    cosine: bool = False  # cosine decay to 0 after warmup; else constant
    milestones: tuple[int, ...] = ()  # steps at which the lr is multiplied by gamma (instead of cosine)
    gamma: float = 0.1
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adam (weight_decay as an L2 term, as torch's Adam) | sgd (sgd: plain momentum)
    # (parameter-name prefix, lr multiple) pairs: a parameter whose name starts with a prefix trains at
    # that multiple of the lr (the first match counts), e.g. a new head faster than a pretrained body.
    lr_scales: tuple[tuple[str, float], ...] = ()
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    ema_decay: float | None = None
    # True: diffusers' EMAModel ramps the decay as min(ema_decay, (1 + s) / (10 + s)) and copies the
    # weights at the first update; False: the constant ema_decay from the first update on, the
    # average starting at the initial weights (the SalUn DDPM reference's EMAHelper).
    ema_warmup: bool = True
    checkpoint_every: int = 0  # 0: only on interruption
    log_every: int = 10
    # With a constraint mask: True restores masked-out weights (and zeroes their optimizer state) after
    # every step; False only masks their gradients, so weight decay still moves them (see MaskConstraint).
    mask_hold: bool = True
    compile: bool = False  # torch.compile the model in place (state-dict keys unchanged); pays on GPUs for long runs
    # True: every process gets the step generator of process 0, for callers that draw one global
    # batch per step and train on their process's shard of it (classification); the global batch
    # is then the single-process run's, whatever the number of processes.
    global_batches: bool = False
    desc: str = "training"

    def __post_init__(self) -> None:
        # The last guard for callers that build settings in code: a loop of zero steps would
        # hand back the untrained model, and its stage would be marked done as if trained.
        if self.steps < 1:
            raise ErasureError(f"{self.desc}: {self.steps} training steps; at least 1 is needed (raise the steps or epochs).")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ErasureError(f"{self.desc}: the learning rate is {self.lr}; it must be a finite number > 0.")

    @classmethod
    def from_config(cls, section: Any, **settings: Any) -> LoopSettings:
        """Settings from a config section: every field the two share by name (steps, lr, seed, ...), then ``settings``."""
        names = {f.name for f in dataclasses.fields(cls)}
        shared = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names}
        return cls(**{**shared, **settings})


class StageAccelerator(Accelerator):
    """accelerate's Accelerator, with mixed precision chosen per stage rather than per process.

    accelerate keeps mixed precision in a process-wide singleton (``AcceleratorState``), so
    a second stage asking for another precision (the judge classifier in fp32 after a bf16
    DDPM, in one ``erasure demo``) raises. We therefore always hand accelerate "no" and
    apply the stage's precision ourselves with ``torch.autocast`` in :meth:`autocast`.
    Only bf16 is offered for training: it needs no loss scaling, so gradients, clipping
    and the optimizer step are those of fp32.

    Trackers likewise: accelerate binds them when the Accelerator is built, before a stage
    knows where its training run writes, so ``tracking`` only names them and :func:`train`
    opens them in the run's folder (see :mod:`erasure.core.tracking`).

    ``unused_weights``: some trainable weights get no gradient in a step, and the loss does not
    come from the model's output (FMN's attention loss never reaches the layers after the last
    cross-attention). One process leaves them alone; DDP fails at the second step unless it
    treats the graph as static: it then learns from the first step which weights get gradients.
    """

    def __init__(self, cpu: bool, precision: str, tracking: tuple[str, ...] = (), unused_weights: bool = False) -> None:
        _release_other_device(cpu)
        handlers = [DistributedDataParallelKwargs(static_graph=True)] if unused_weights else None
        super().__init__(cpu=cpu, mixed_precision="no", kwargs_handlers=handlers)
        self.precision = precision
        self.tracking = tracking

    @contextmanager
    def autocast(self, autocast_handler: object = None):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            yield


def _release_other_device(cpu: bool) -> None:
    """Let a single process move between the CPU and a GPU from one stage to the next.

    The singleton fixes the device too: a CPU stage after a CUDA one (a test suite on a GPU
    machine, a notebook) raises in accelerate. One process owns its state and may reset it;
    the processes of a launched job share a device type and may not.
    """
    if not PartialState._shared_state:
        return
    state = PartialState()
    if (state.device.type == "cpu") == cpu:
        return
    if state.num_processes > 1:
        raise ErasureError(
            f"this job's {state.num_processes} processes run on {state.device.type}; a stage cannot switch to "
            f"{'the CPU' if cpu else 'the GPU'} within it. Use one device setting for every stage of a launched job."
        )
    AcceleratorState._reset_state(reset_partial_state=True)


def on_cpu(device: str = "auto") -> bool:
    """Whether a run with ``device`` (auto, cpu, cuda[:N]) runs on the CPU.

    Yes for ``cpu``, on a machine without CUDA, and where accelerate's own flag
    ``ACCELERATE_USE_CPU`` is set (``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...``
    runs CPU processes over gloo even on a GPU machine): the Accelerator obeys that flag, so
    the precision and the evaluation commands' device must too.
    """
    return device == "cpu" or not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")


def process_state() -> PartialState:
    """This process's place in the job: index, count and device (one process unless ``accelerate launch`` started several).

    Commands that train build an Accelerator, which joins the launched processes; the
    evaluation commands only need this. CPU processes must be asked to join over gloo
    (``cpu=True``), or each would believe itself alone and do all the work.
    """
    return PartialState(cpu=on_cpu())


def resolve_precision(mixed_precision: str, cpu: bool) -> str:
    """'auto' is bf16 on a GPU that has it (or what ``accelerate launch --mixed_precision`` asked for), else fp32."""
    if mixed_precision == "auto":
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
        if launched in ("no", "bf16"):
            return launched
        return "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision == "fp16":
        raise ErasureError("mixed_precision=fp16 is not supported for training (it needs loss scaling); use bf16, auto or no.")
    if mixed_precision not in ("no", "bf16"):
        raise ErasureError(f"unknown mixed_precision '{mixed_precision}'; choose auto, bf16 or no.")
    return mixed_precision


def stage_precision(config: Any) -> str:
    """The precision ("no" or "bf16") a stage of ``config`` trains in, as its Accelerator will resolve it.

    Part of the fingerprints of the stages that train under ``config.mixed_precision``: a bf16
    model is another model than an fp32 one, while "auto" on a CPU is the same run as "no".
    """
    return resolve_precision(config.mixed_precision, on_cpu(config.device))


def make_accelerator(
    device: str = "auto", mixed_precision: str = "auto", log_with: str | None = "none", unused_weights: bool = False
) -> StageAccelerator:
    """An Accelerator for the configured device, autocasting to this stage's precision, logging to ``log_with``'s trackers.

    Any number of stages with different precisions may run in one process (see :class:`StageAccelerator`,
    also for ``unused_weights``).
    """
    cpu = on_cpu(device)
    return StageAccelerator(cpu, resolve_precision(mixed_precision, cpu), parse_log_with(log_with), unused_weights)


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], s: LoopSettings) -> torch.optim.Optimizer:
    """AdamW (diffusion models), Adam (the DDPM reference's judge) or SGD with momentum (the classification recipes).

    One parameter group per lr multiple of ``s.lr_scales`` (its ``lr_scale`` read by the loop's schedule).
    """
    scales: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        scale = next((x for prefix, x in s.lr_scales if name.startswith(prefix)), 1.0)
        scales.setdefault(scale, []).append(p)
    groups = [{"params": params, "lr": s.lr * scale, "lr_scale": scale} for scale, params in scales.items()]
    params = [p for _, p in named]
    if s.optimizer in ("adamw", "adam"):
        # The fused CUDA kernel updates every tensor in one launch instead of a dozen per tensor.
        fused = bool(params) and all(p.is_cuda for p in params)
        adam = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
        return adam(groups, lr=s.lr, weight_decay=s.weight_decay, fused=fused or None)
    if s.optimizer == "sgd":
        if s.nesterov and s.momentum <= 0:
            raise ErasureError("Nesterov momentum needs momentum > 0; set momentum (e.g. 0.9) or nesterov=false.")
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov)
    raise ErasureError(f"unknown optimizer '{s.optimizer}'; choose adamw, adam or sgd.")


def shard(n: int, rank: int, processes: int) -> slice:
    """Process ``rank``'s contiguous share of a global batch of ``n`` items (the first ``n % processes`` get one more)."""
    size, extra = divmod(n, processes)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def shard_weight(part: slice, n: int, processes: int) -> float:
    """The factor on a shard's mean loss that makes DDP's average over processes the whole batch's mean loss.

    DDP averages the processes' gradients; weighting each shard by its share of the batch keeps that
    exact for a last batch that does not split evenly. With one process it is exactly 1.
    """
    return (part.stop - part.start) * processes / n


def step_generator(seed: int, step: int, process: int, device: torch.device) -> torch.Generator:
    """The generator for one step of one process: reproducible, and different per process."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 1_009 + process)


def host_generator(g: torch.Generator) -> torch.Generator:
    """A CPU generator for draws the host needs as numbers (loop lengths, choices).

    Reading a number drawn on a CUDA generator would stall the GPU's queue every step; the
    CPU twin is seeded from ``g``'s seed (a host value), so runs stay reproducible. On the
    CPU it is ``g`` itself.
    """
    return g if g.device.type == "cpu" else torch.Generator().manual_seed(g.initial_seed())


def _lr_factor(step: int, s: LoopSettings) -> float:
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.milestones:
        return s.gamma ** sum(step >= m for m in s.milestones)
    if not s.cosine:
        return 1.0
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(
    model: torch.nn.Module,
    step_loss: StepLoss,
    settings: LoopSettings,
    folder: str | Path,
    accelerator: Accelerator,
    constraint_mask=None,  # a saliency.Mask: only its True entries may change
    fingerprint: str = "",
    monitor: Monitor | None = None,
) -> tuple[torch.nn.Module, EMAModel | None]:
    """Optimize ``model`` for ``settings.steps`` steps, resuming from ``folder/checkpoint``.

    Returns the trained (unwrapped) model and its EMA, if one was kept. ``monitor`` sees
    the model after every step, and its state travels with the checkpoints.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt_dir = folder / "checkpoint"
    model = model.to(accelerator.device)
    # Built before a checkpoint is loaded, so it holds the base values of masked-out weights.
    constraint = MaskConstraint(model, constraint_mask, settings.mask_hold) if constraint_mask is not None else None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    optimizer = make_optimizer(named, settings)
    ema = None
    if settings.ema_decay:  # imported here: the classification path runs without diffusers
        from diffusers.training_utils import EMAModel

        if settings.ema_warmup:
            ema = EMAModel(params, decay=settings.ema_decay)
        else:
            # min_decay pins the decay; update_after_step=-1 makes the first update use it too (not a copy).
            ema = EMAModel(params, decay=settings.ema_decay, min_decay=settings.ema_decay, update_after_step=-1)

    start = 0
    state = load_checkpoint(ckpt_dir)
    if state is not None:
        if state.get("fingerprint", "") != fingerprint:
            raise ErasureError(f"the checkpoint in '{ckpt_dir}' was made with different settings; delete it to start over.")
        _load_trained_state(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _match_state_to_params(optimizer)
        if ema is not None:
            ema.load_state_dict({**state["ema_state"], "shadow_params": [state["ema"][n] for n in names]})
            # The file's tensors are CPU and contiguous: the averages live beside their parameters.
            ema.shadow_params = [_like(p, s) for p, s in zip(params, ema.shadow_params)]
        if monitor is not None:
            monitor.load(state.get("monitor", {}), state.get("monitor_values", {}))
        start = state["step"]
        accelerator.print(f"resuming {settings.desc} from step {start} ({ckpt_dir})")

    if settings.compile:
        model.compile()  # in place: parameters, masks, checkpoints and state-dict keys stay those of the eager model
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)  # the module itself (DDP wraps it): unwrapped once, not every step

    def checkpoint(step: int) -> None:
        if not accelerator.is_main_process:
            return
        tensors = {"model": _trained_state(inner)}
        extra = {"optimizer": optimizer.state_dict(), "fingerprint": fingerprint}
        if ema is not None:
            ema_state = ema.state_dict()
            tensors["ema"] = dict(zip(names, ema_state.pop("shadow_params")))
            extra["ema_state"] = ema_state
        if monitor is not None:
            tensors["monitor"], extra["monitor_values"] = monitor.state()
        save_checkpoint(ckpt_dir, step, tensors, extra)

    log_path = folder / "log.csv"
    _truncate_log(log_path, start)
    step = start
    bar = tqdm(total=settings.steps, initial=start, desc=settings.desc, disable=not accelerator.is_main_process)
    model.train()
    tracker = _tracker_run(accelerator, folder, settings, constraint_mask, start)
    # The loss is checked for NaN/inf on the device and read back only on logged steps and
    # before checkpoints: reading it every step would stall the GPU's queue once per step.
    # A bad step is still never saved, since every checkpoint and the final save come after a check.
    finite = FiniteLosses(start)
    with _StopRequests() as stop, tracker:
        for step in range(start, settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * group.get("lr_scale", 1.0) * _lr_factor(step, settings)  # get: checkpoints from before lr_scale
            stream = 0 if settings.global_batches else accelerator.process_index
            g = step_generator(settings.seed, step, stream, accelerator.device)
            with accelerator.autocast():
                loss, logs = step_loss(model, g, step)
            finite.add(loss)
            accelerator.backward(loss)
            logging = step % settings.log_every == 0 or step == settings.steps - 1
            grad_norm = accelerator.clip_grad_norm_(params, settings.grad_clip) if settings.grad_clip else None
            if logging and grad_norm is None:  # unclipped runs pay for the norm only on the steps they log
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if constraint is not None:
                constraint.enforce(optimizer)
            if ema is not None:
                ema.step(params)
            if monitor is not None:
                monitor.after_step(inner, step + 1)
            bar.update(1)
            stopping = stop.agreed()
            every = settings.checkpoint_every
            saving = stopping or (bool(every) and (step + 1) % every == 0 and step + 1 < settings.steps)
            if logging or saving or step == settings.steps - 1:
                finite.check(step, accelerator)
            if logging:
                # Methods may log tensors (no host sync inside the step); they become numbers here.
                logs = {k: float(v) for k, v in logs.items()}
                # The mean over processes: the loss of the whole step's batch, not the main process's share.
                value = accelerator.reduce(loss.detach(), reduction="mean") if accelerator.num_processes > 1 else loss
                row = {"step": step, "loss": value.item(), "lr": optimizer.param_groups[0]["lr"], **logs}
                row["grad_norm"] = float(grad_norm)  # before clipping
                bar.set_postfix(loss=f"{row['loss']:.4f}", **(monitor.postfix() if monitor is not None else {}))
                if accelerator.is_main_process:
                    _append_log(log_path, row)
                    tracker.log({k: v for k, v in row.items() if k != "step"}, step)
            if stopping:
                checkpoint(step + 1)
                bar.close()
                raise KeyboardInterrupt(f"stopped after step {step + 1}; rerun the same command to resume")
            if saving:
                checkpoint(step + 1)
    bar.close()
    if constraint is not None:
        constraint.remove()
    check_weights(inner, settings.steps, settings.lr)
    accelerator.wait_for_everyone()
    return inner, ema


class FiniteLosses:
    """Whether every loss since the last check was finite, kept on the device until checked."""

    def __init__(self, start: int) -> None:
        self.since = start  # first step not yet checked
        self.bad: torch.Tensor | None = None  # a device-side flag: some loss since `since` was NaN or inf

    def add(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.bad = bad if self.bad is None else self.bad | bad

    def check(self, step: int, accelerator: Accelerator) -> None:
        """Raise if a loss of steps ``since..step`` was not finite on any process (one host read for all of them).

        Every process checks at the same steps, so with several the flags are combined and
        all of them stop together instead of the others waiting for the one that raised.
        """
        bad = self.bad if self.bad is not None else torch.zeros((), dtype=torch.bool, device=accelerator.device)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad.float().reshape(1), reduction="sum") > 0
        if bool(bad):
            where = f"at step {step}" if self.since == step else f"between steps {self.since} and {step}"
            raise ErasureError(
                f"the loss became NaN or inf {where}; nothing after the last checkpoint was saved. "
                "Lower the learning rate (or turn on gradient clipping) and rerun."
            )
        self.since, self.bad = step + 1, None


MAX_WEIGHT = 1e4  # healthy weights are O(1); this is far past any trained net and far below a diverged one


def check_weights(model: torch.nn.Module, step: int, lr: float) -> None:
    """Refuse to finish a stage whose trainable weights are non-finite or have exploded.

    The loss check inside the loop cannot see the last optimizer step (its loss was
    finite), so a diverged final step would otherwise be saved and marked done.
    """
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue  # frozen weights cannot have changed
        largest = p.detach().abs().max().item() if p.numel() else 0.0
        if not math.isfinite(largest) or largest > MAX_WEIGHT:
            what = "is not finite (NaN or inf)" if not math.isfinite(largest) else f"reached |w| = {largest:.3g} (> {MAX_WEIGHT:g})"
            raise ErasureError(
                f"training diverged: after step {step} the weight '{name}' {what}. "
                f"Nothing was saved as finished; lower the learning rate (lr={lr:g}) and rerun."
            )


def _tracker_run(accelerator: Accelerator, folder: Path, settings: LoopSettings, mask: Any, start: int) -> TrackerRun:
    """The trackers the accelerator names (none for a plain Accelerator), opened in ``folder``.

    The mask fraction is logged once, at the run's first (or resumed) step, with the settings as hyper-parameters.
    """
    names = getattr(accelerator, "tracking", ())
    hparams = {**dataclasses.asdict(settings), "mask_kept_fraction": mask.kept_fraction if mask is not None else 1.0}
    run = TrackerRun(names, folder, f"{folder.name} ({settings.desc})", hparams, accelerator.is_main_process)
    run.log({"mask_kept_fraction": hparams["mask_kept_fraction"]}, start)
    return run


def _trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of the state dict that training can change: trainable parameters and buffers.

    Frozen weights are left out, so an ESD-x checkpoint of the SD UNet is ~100 MB, not 3.4 GB.
    """
    changing = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in changing}


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` on ``param``'s device with its dtype and memory layout (channels-last included)."""
    return torch.empty_like(param).copy_(value)


def _match_state_to_params(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded state tensor shaped like its parameter the parameter's strides.

    A checkpoint stores contiguous tensors, while a GPU run keeps convolution weights
    channels-last; fused AdamW refuses moments whose strides differ from the weight's.
    (``load_state_dict`` already moved them to the parameter's device and dtype.)
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = _like(p, value)


def _load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = _trained_state(model).keys()
    if set(state) != set(expected):
        raise ErasureError("the checkpoint does not hold this run's trainable weights; delete the checkpoint folder to start over.")
    model.load_state_dict(state, strict=False)


class _StopRequests:
    """Turn Ctrl-C / SIGTERM into a request honoured at the end of the current step.

    Stopping between steps keeps model, optimizer and step count consistent, so the
    checkpoint written on the way out resumes exactly. A second Ctrl-C stops at once.
    """

    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self) -> bool:
        """Whether any process was asked to stop; all ranks must stop at the same step."""
        return any_process(self.requested)

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _append_log(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_log(path: Path, start: int) -> None:
    """Drop log rows past the resumed step, so a resumed run's log has no duplicates."""
    if not path.exists():
        return
    if start == 0:
        path.unlink()
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < start]
    path.write_text("".join(kept))
