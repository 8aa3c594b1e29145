"""Benchmark: seconds per step, peak GPU memory and achieved TFLOP/s of SD erasure training.

Builds the full-size Stable Diffusion v1.4 architecture (UNet 859.5M parameters, VAE,
CLIP ViT-L text encoder) from its published configs with random weights and the real
CLIP tokenizer, then times the real method code (``erasure.sd.methods``) inside the real
training loop (``erasure.core.loop.train``) for every combination of

- phase: the SalUn mask pass, the SalUn fine-tune step, ESD-x, FMN;
- batch size (default 1, 4, 8) at a resolution (default 512 px, i.e. 64x64 latents);
- precision: fp32 ("no") or bf16 autocast; gradient checkpointing on or off;
  ``torch.compile`` off or on (its compile time is reported separately). On a GPU the
  UNet is channels-last, as ``erasure sd erase`` runs it; the fp32 eager row is the
  reference regime every speed-up is compared with, measured in the same run.

Latents and text embeddings are random (the step cost does not depend on their values).
FLOPs per step are counted with ``torch.utils.flop_counter`` on one forward+backward
without checkpointing (model FLOPs; recomputation is not counted), so TFLOP/s is the
model-FLOPs rate. ESD's step includes its DDIM trajectory to a random stop (50 steps,
so 25 on average), which makes its time vary from step to step: the mean is reported,
and it gets no FLOP count. Peak memory is the GPU's ``max_memory_allocated`` (it
includes the bf16 VAE and text encoder, as in a real job); on a CPU it is not measured.

GPU (one H100; takes ~10 minutes):

    python benchmarks/sd_training.py --tokenizer ../shared/data/clip_tokenizer --label h100

CPU, reduced (what a machine without a GPU can do in minutes):

    python benchmarks/sd_training.py --tokenizer ../shared/data/clip_tokenizer --label cpu-reduced \\
        --resolution 64 --batch-sizes 1 --precisions no --checkpointing off --esd-ddim-steps 4 \\
        --measure-steps 2 --warmup-steps 1
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from common import flop_counter, machine, sd14, sync  # benchmarks/ is on sys.path when a script runs
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from erasure.core.config import load_config
from erasure.core.io import write_json
from erasure.core.loop import LoopSettings, make_accelerator, train
from erasure.core.saliency import accumulate_gradients
from erasure.sd.config import SDConfig, load_concept
from erasure.sd.methods import SD_METHODS, SDContext
from erasure.sd.methods.base import LatentSet
from erasure.sd.model import encode_conditioning, noise_scheduler
from erasure.sd.pipeline import hold_frozen_weights_in_bf16

RESULTS = Path(__file__).parent / "results"


def context(pipe: StableDiffusionPipeline, config: SDConfig, latent: int, device: torch.device) -> SDContext:
    """The method context with random latents (each read a posterior sample, train.latents' default) and the real prompts' embeddings."""
    concept = load_concept(config.concept)
    g = torch.Generator().manual_seed(0)
    sets = {}
    for name in ("forget", "retain"):
        prompts = getattr(concept, name)
        latents = torch.randn(64, 4, latent, latent, generator=g).to(device)
        std = None if config.train.latents == "mean" else torch.full_like(latents, 0.05)
        index = torch.arange(64, device=device) % len(prompts)
        sets[name] = LatentSet(latents, index, encode_conditioning(pipe, prompts).float(), prompts, std)
    uncond = encode_conditioning(pipe, [""]).float()
    return SDContext(config, concept, pipe, noise_scheduler(pipe), sets, uncond, device)


def setup(
    args: argparse.Namespace, pipe: StableDiffusionPipeline, base: UNet2DConditionModel, phase: str, batch: int, device, graph: bool = False
):
    """A fresh trainable copy of the UNet and the phase's method on it (``graph``: ESD's trajectory through CUDA graphs)."""
    method_name = "salun" if phase.startswith("salun") else phase
    overrides = [f"method={method_name}", f"train.batch_size={batch}", f"mask.batch_size={batch}", f"esd.ddim_steps={args.esd_ddim_steps}"]
    overrides.append(f"esd.cuda_graph={str(graph).lower()}")
    overrides.append("fmn.textual_inversion=false")  # its 500-step first stage changes the prompt, not the timed step
    config = load_config("configs/sd/nudity_salun.yaml", overrides, schema=SDConfig)
    unet = pipe.unet = copy.deepcopy(base).to(device)
    method = SD_METHODS.get(method_name)(context(pipe, config, args.resolution // 8, device))
    for name, p in unet.named_parameters():
        p.requires_grad_(method.trainable(name))
    return unet, method


def measure(
    args: argparse.Namespace,
    pipe: StableDiffusionPipeline,
    base: UNet2DConditionModel,
    phase: str,
    batch: int,
    precision: str,
    ckpt: bool,
    compiled: bool = False,
    graph: bool = False,
) -> dict:
    """Time one setting: seconds per step and peak GPU memory."""
    AcceleratorState._reset_state(True)  # a fresh Accelerator per precision in one process
    accelerator = make_accelerator(args.device, precision)
    device = accelerator.device
    unet, method = setup(args, pipe, base, phase, batch, device, graph)
    if ckpt:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)  # as erasure.sd.pipeline.erase runs it
    if compiled and phase == "salun-mask":
        unet.compile()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    starts: list[float] = []
    total = args.warmup_steps + args.measure_steps

    if phase == "salun-mask":
        g = torch.Generator(device).manual_seed(0)

        def mask_loss(m, _):
            sync()
            starts.append(time.perf_counter())
            return method.saliency_loss(m, g)

        with accelerator.autocast():
            accumulate_gradients(unet, mask_loss, range(total), progress=False)
        sync()
        starts.append(time.perf_counter())
    else:
        method.prepare(unet)
        if precision == "bf16":
            hold_frozen_weights_in_bf16(unet)  # as erasure.sd.pipeline.erase trains (a no-op where all weights train)

        def step_loss(m, g, step):
            sync()
            starts.append(time.perf_counter())
            return method.loss(m, g)

        clip = method.ctx.config.train.grad_clip  # what the shipped config does
        settings = LoopSettings(steps=total, lr=1e-5, grad_clip=clip, log_every=1000, compile=compiled, desc=f"{phase} b{batch}")
        with tempfile.TemporaryDirectory() as folder:
            train(unet, step_loss, settings, folder, accelerator)
        sync()
        starts.append(time.perf_counter())
    times = [b - a for a, b in zip(starts, starts[1:])]
    first_step = times[0]  # includes compilation when compiled
    times = times[args.warmup_steps :]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result = {
        "phase": phase,
        "batch_size": batch,
        "precision": "bf16" if precision == "bf16" else "fp32",
        "gradient_checkpointing": ckpt,
        "compiled": compiled,
        **({"cuda_graph": graph} if phase.startswith("esd") else {}),
        "first_step_seconds": round(first_step, 2),
        "seconds_per_step": round(statistics.mean(times), 4),
        "seconds_per_step_all": [round(t, 4) for t in times],
        "peak_memory_gib": round(peak, 2) if peak is not None else None,
    }
    pipe.unet = base  # drops the trained copy
    return result


def count_flops(pipe: StableDiffusionPipeline, base: UNet2DConditionModel, phase: str, batch: int, args: argparse.Namespace) -> float:
    """Model FLOPs of one forward+backward of the phase's loss (fp32, no checkpointing)."""
    AcceleratorState._reset_state(True)
    device = make_accelerator(args.device, "no").device
    unet, method = setup(args, pipe, base, phase, batch, device)
    g = torch.Generator(device).manual_seed(0)
    if phase != "salun-mask":
        method.prepare(unet)
    with flop_counter() as counter:
        loss = method.saliency_loss(unet, g) if phase == "salun-mask" else method.loss(unet, g)[0]
        loss.backward()
    pipe.unet = base
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder with the SD v1.x CLIP tokenizer (vocab.json, merges.txt)")
    parser.add_argument("--label", required=True, help="names the result file, e.g. h100 or cpu-reduced")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    parser.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["on", "off"], help="torch.compile the UNet (default off)")
    parser.add_argument("--phases", nargs="+", default=["salun-mask", "salun", "esd-x", "fmn"])
    parser.add_argument(
        "--esd-cuda-graph", nargs="+", default=["off"], choices=["on", "off"], help="ESD's trajectory through CUDA graphs (esd.cuda_graph)"
    )
    parser.add_argument("--esd-ddim-steps", type=int, default=50, help="length of ESD's sampling trajectory (the reference uses 50)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--measure-steps", type=int, default=5)
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra fp32 step per phase and batch)")
    args = parser.parse_args()

    pipe = sd14(args.tokenizer, torch.float32)
    device = make_accelerator(args.device, "no").device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe.vae.to(device, dtype)  # the frozen parts sit on the GPU in a real job, so they count in its memory
    pipe.text_encoder.to(device, dtype)
    base = pipe.unet
    flops = {}
    if not args.no_flops:
        # ESD's step cost depends on its random trajectory length, so it gets no single FLOP count.
        for phase in [p for p in args.phases if p != "esd-x"]:
            for batch in args.batch_sizes:
                flops[(phase, batch)] = count_flops(pipe, base, phase, batch, args)
                print(f"flops {phase} b{batch}: {flops[(phase, batch)] / 1e12:.2f} TFLOP", flush=True)
    rows = []
    for phase in args.phases:
        for batch in args.batch_sizes:
            for precision in args.precisions:
                graphs = args.esd_cuda_graph if phase.startswith("esd") else ["off"]
                for ckpt, compiled, graph in [(c, k, g) for c in args.checkpointing for k in args.compile for g in graphs]:
                    try:
                        row = measure(args, pipe, base, phase, batch, precision, ckpt == "on", compiled == "on", graph == "on")
                    except torch.OutOfMemoryError:
                        row = {"phase": phase, "batch_size": batch, "precision": precision, "checkpointing": ckpt, "error": "out of memory"}
                        pipe.unet = base
                        torch.cuda.empty_cache()
                    if (phase, batch) in flops and "seconds_per_step" in row:
                        row["tflop_per_step"] = round(flops[(phase, batch)] / 1e12, 3)
                        row["achieved_tflops"] = round(flops[(phase, batch)] / row["seconds_per_step"] / 1e12, 4)
                    rows.append(row)
                    print(row, flush=True)
    result = {
        "benchmark": "sd_training",
        "label": args.label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(("torch", "diffusers", "transformers", "accelerate")),
        "settings": {k: v for k, v in vars(args).items() if k != "tokenizer"},
        "unet_parameters": sum(p.numel() for p in base.parameters()),
        "results": rows,
    }
    out = RESULTS / f"sd_training_{args.label}.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
