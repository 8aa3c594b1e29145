"""The generation engine: prompts and seeds in, image files and a manifest out.

Every SD image the toolkit makes goes through :func:`generate`: the forget and target
training sets, evaluation sets and audits. It is

- seeded per item: an item's image depends only on its prompt, seed and settings, not on
  the batch it landed in or the number of processes;
- sharded: with N processes, process r makes items r, r+N, ...;
- resumable: an image file that exists is never made again, and files are written
  atomically, so an interrupted run leaves no half-written image;
- documented: ``manifest.jsonl`` lists every file with its prompt, seed, guidance, steps,
  size, scheduler, noise generator and model.

Initial noise (:func:`initial_latents`): item ``i`` with seed ``s`` and ``noise_index`` ``j``
starts from the ``j``-th of the latents drawn one after another from a generator seeded ``s``.
``generator="cpu"`` draws them in fp32 on the CPU, as the reference evaluation scripts'
``torch.randn(..., generator=torch.manual_seed(seed))`` (the same latents on any device,
then cast to the pipeline's dtype); ``"device"`` draws them on the pipeline's device in its
dtype, as diffusers does with a generator there (what the training sets use).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

import torch
from accelerate.utils import find_executable_batch_size
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from tqdm.auto import tqdm

from erasure.core.errors import ErasureError
from erasure.core.io import atomic_path, write_text
from erasure.core.loop import process_state

# Where the initial noise is drawn: "cpu" (the reference evaluation scripts' torch.manual_seed) or the pipeline's device.
GENERATORS = ("cpu", "device")
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "lms": LMSDiscreteScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}


@dataclass(frozen=True)
class Item:
    """One image to generate."""

    prompt: str
    seed: int
    guidance: float = 7.5
    steps: int = 50
    width: int | None = None  # None: the model's native size
    height: int | None = None
    negative_prompt: str = ""
    # Which row of the seed's noise stream starts this image: image j of a prompt whose K images
    # come from one generator (the reference's batch of K) has noise_index j; 0 for a lone image.
    noise_index: int = 0

    def settings(self) -> tuple:
        """Items that share these can be generated in one batch."""
        return (self.guidance, self.steps, self.width, self.height)


def image_path(folder: str | Path, index: int) -> Path:
    """Where item ``index`` of a generation lives."""
    return Path(folder) / f"{index:06d}.png"


def check_scheduler(name: str) -> None:
    """A clear error for an unknown sampler."""
    if name not in SCHEDULERS:
        raise ErasureError(f"unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}.")


def check_generator(generator: str) -> None:
    """A clear error for an unknown noise generator."""
    if generator not in GENERATORS:
        raise ErasureError(f"unknown generator '{generator}'; choose cpu (the reference's torch.manual_seed) or device.")


def initial_latents(pipe: DiffusionPipeline, item: Item, generator: str = "cpu", streams: dict | None = None) -> torch.Tensor:
    """The initial latents ``[1, C, h, w]`` of ``item``, on the pipeline's device in the dtype it denoises in.

    The ``item.noise_index``-th of the latents drawn one after another from a generator seeded
    with ``item.seed``: on the CPU in fp32 (``generator="cpu"``, as the reference's
    ``torch.randn(shape, generator=torch.manual_seed(seed))``, so a batch of K images of one
    prompt there is draws 0..K-1 here), or on the pipeline's device in its dtype
    (``"device"``: draw 0 is the very latents diffusers draws with
    ``generator=torch.Generator(device).manual_seed(seed)``). Not yet scaled by the
    scheduler's ``init_noise_sigma`` (the pipeline does that). ``streams``, a dict the caller
    keeps, holds the last seed's generator and draws, so a prompt's K images cost K draws,
    not K (K + 1) / 2.
    """
    check_generator(generator)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = item.width or native, item.height or native
    shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    device = pipe.unet.device
    # The dtype diffusers draws its own noise in: that of the prompt embeddings.
    encoder = getattr(pipe, "text_encoder_2", None) or getattr(pipe, "text_encoder", None)
    dtype = encoder.dtype if encoder is not None else pipe.unet.dtype
    key = (item.seed, shape, generator)
    streams = {} if streams is None else streams
    if key not in streams:
        streams.clear()  # one prompt's images come together: keeping only the last seed's draws bounds the memory
        on = "cpu" if generator == "cpu" else device
        streams[key] = (torch.Generator(on).manual_seed(item.seed), [], torch.float32 if generator == "cpu" else dtype, on)
    g, drawn, draw_dtype, on = streams[key]
    while len(drawn) <= item.noise_index:
        drawn.append(torch.randn(shape, generator=g, device=on, dtype=draw_dtype))
    return drawn[item.noise_index].to(device=device, dtype=dtype)


# The noise schedule proper, as opposed to a sampler's own settings (timestep spacing, offsets).
NOISE_SCHEDULE = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Swap the pipeline's sampler for ``name`` (same noise schedule).

    "lms" is built from the noise schedule alone, every other setting at LMS's defaults, as
    the reference evaluation scripts build it (``LMSDiscreteScheduler(beta_start=0.00085,
    beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)`` for SD v1.4).
    From a whole config it would inherit whatever timestep spacing the file names (a pipeline
    saved by another tool writes PNDM's "leading"; erasure's own saves keep the base's file,
    see :func:`erasure.sd.model.save_pipeline`). The other samplers take the pipeline's config.
    """
    check_scheduler(name)
    if name == "lms":
        pipe.scheduler = LMSDiscreteScheduler(**{k: v for k, v in pipe.scheduler.config.items() if k in NOISE_SCHEDULE})
    else:
        pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)


# batch_size="auto" starts here on a GPU: the UNet then runs 64 rows (guidance doubles the
# batch), past which an H100 gains little; a batch that runs out of memory is halved.
AUTO_BATCH_GPU = 32
AUTO_BATCH_CPU = 4  # a CPU gains nothing from large batches, and its allocator swaps rather than failing
# The batch "auto" settled on, by device, pipeline class and image sizes: an audit loads one
# pipeline per model, and each would otherwise find the limit again by running out of memory.
_FITTED: dict[tuple, int] = {}


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    items: list[Item],
    folder: str | Path,
    model_name: str,
    scheduler: str = "ddim",
    batch_size: int | str = 4,
    desc: str = "generating",
    compile: bool = False,
    generator: str = "device",
) -> list[Path]:
    """Make every missing image of ``items`` in ``folder``; returns all their paths in order.

    Call it from every process of an ``accelerate launch``: each makes its share, and the
    main process writes the manifest once all are done. ``batch_size="auto"`` takes the
    largest batch that fits in free memory: it starts at :data:`AUTO_BATCH_GPU` (on a CPU,
    :data:`AUTO_BATCH_CPU`) and halves whenever a batch runs out of memory, keeping the images
    already saved. ``compile`` runs the UNet through ``torch.compile`` (minutes of compiling
    for SD v1.4; it pays on long runs): every batch is then padded to the batch size so that
    one compiled shape serves them all. ``generator``: where each item's initial noise is
    drawn, see :func:`initial_latents` ("device" here, the training sets' setting; the
    evaluation commands pass "cpu", the reference's).
    """
    check_generator(generator)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = process_state()
    set_scheduler(pipe, scheduler)
    mine = [i for i in range(len(items)) if i % state.num_processes == state.process_index and not image_path(folder, i).exists()]
    device = pipe.unet.device
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores; same numbers
    bar = tqdm(total=len(mine), desc=desc, disable=not state.is_main_process or not mine)
    compiled = compile and bool(mine)
    if compiled:
        # Only forward is compiled (an instance attribute over the class's method), and it is
        # removed again below, so whatever uses the UNet next (e.g. training) gets it as it was.
        pipe.unet.forward = torch.compile(pipe.unet.forward)
    try:
        if batch_size == "auto":
            key = (str(device), type(pipe).__name__, tuple(sorted({(items[i].width, items[i].height) for i in mine}, key=str)))
            size = start = min(_FITTED.get(key, AUTO_BATCH_GPU if device.type == "cuda" else AUTO_BATCH_CPU), max(len(mine), 1))

            def halve() -> int:
                nonlocal size
                size //= 2
                if size:
                    bar.write(f"{desc}: batch {size * 2} ran out of memory; going on at batch {size}")
                return size

            # accelerate retries the whole call on an out-of-memory error; images saved so far are kept.
            run = find_executable_batch_size(_generate_batches, starting_batch_size=start, reduce_batch_size_fn=halve)
            try:
                run(pipe, items, folder, mine, bar, compiled, generator)
                if size < start:
                    _FITTED[key] = size
            except RuntimeError as e:
                if "No executable batch size" not in str(e):
                    raise
                raise ErasureError(
                    f"{desc}: even one image at a time runs out of memory on {device}; free memory or use a smaller resolution."
                ) from e
        elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
            _generate_batches(batch_size, pipe, items, folder, mine, bar, compiled, generator)
        else:
            raise ErasureError(f"batch size {batch_size!r}: give a whole number >= 1, or 'auto' (the largest that fits in memory).")
    finally:
        if compiled:
            del pipe.unet.forward
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        lines = [
            json.dumps(
                {"file": image_path(folder, i).name, **asdict(item), "scheduler": scheduler, "generator": generator, "model": model_name}
            )
            for i, item in enumerate(items)
        ]
        write_text(folder / "manifest.jsonl", "\n".join(lines) + "\n")
    state.wait_for_everyone()
    return [image_path(folder, i) for i in range(len(items))]


def _generate_batches(
    batch_size: int,
    pipe: DiffusionPipeline,
    items: list[Item],
    folder: Path,
    mine: list[int],
    bar: tqdm,
    compiled: bool,
    generator: str = "device",
) -> None:
    """Make the images of ``mine`` not saved yet, ``batch_size`` at a time (compiled: every batch padded to it)."""
    device = pipe.unet.device
    todo = [i for i in mine if not image_path(folder, i).exists()]  # a retry at a smaller batch skips what is saved
    # PNG encoding and writing run in a thread while the GPU denoises the next batch.
    saver = ThreadPoolExecutor(max_workers=2)
    pending = []
    streams: dict = {}  # see initial_latents
    try:
        # Grouping by settings keeps batches homogeneous; within a group, items keep their order. (A size of None, the
        # model's native one, sorts before any number: rows with and without a size in one file mix.)
        def order(i: int) -> tuple:
            return tuple((v is not None, v or 0) for v in items[i].settings())

        for _, group in groupby(sorted(todo, key=lambda i: (order(i), i)), key=lambda i: items[i].settings()):
            group = list(group)
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                # Compiled: a short last batch is padded with copies of its last item, whose images are dropped.
                rows = chunk + chunk[-1:] * (batch_size - len(chunk)) if compiled else chunk
                first = items[chunk[0]]
                images = pipe(
                    [items[i].prompt for i in rows],
                    negative_prompt=[items[i].negative_prompt for i in rows] if any(items[i].negative_prompt for i in rows) else None,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance,
                    width=first.width,
                    height=first.height,
                    latents=torch.cat([initial_latents(pipe, items[i], generator, streams) for i in rows]),
                    # Only a stochastic sampler step would draw from these (none of SCHEDULERS does); they keep
                    # such draws per item and off the global generator.
                    generator=[torch.Generator(device).manual_seed(items[i].seed) for i in rows],
                ).images
                pending += [saver.submit(_save_png, image, image_path(folder, i)) for i, image in zip(chunk, images)]
                bar.update(len(chunk))
    finally:
        saver.shutdown(wait=True)  # before a retry recounts what is saved
    for job in pending:
        job.result()  # re-raise a failed write here, in the caller


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_manifest(folder: str | Path) -> list[dict]:
    """The rows of a generation's ``manifest.jsonl``."""
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines() if line.strip()]
