"""Benchmark: audit throughput, i.e. SD v1.4 images/s at 512 px through the shared engine, and NudeNet images/s.

Builds the full-size Stable Diffusion v1.4 architecture (UNet 859.5M parameters, VAE, CLIP
ViT-L/14 text encoder) from its published configs (inline below) with random weights and
the real CLIP tokenizer, and times :func:`erasure.sd.generate.generate` exactly as the
audits call it (DDIM, classifier-free guidance, PNG writing). Then NudeNet 3.x scores the
saved 512 px files. Random weights cost the same as trained ones: only the values differ.

The UNet's forward time is measured with hooks, so the JSON also holds the seconds per
denoising step, the UNet's achieved TFLOP/s (its model FLOPs counted once with torch's
FlopCounterMode) and the fixed cost per image (text encoder, VAE decode, PNG), from which
the time per image at 50 and 100 steps is extrapolated, and with it the time of a full
4,703-prompt I2P audit (one model): generation plus NudeNet.

GPU (one H100, fp16; ``make gpu-check`` runs it at 16 images, and with ``--compile`` also compiled):

    python benchmarks/generation_throughput.py --tokenizer ../shared/data/clip_tokenizer --label h100 \\
        --images 32 --batch-size 8 --steps 50 --dtype fp16 [--compile]

CPU, reduced (2 images at 3 steps, the recorded cpu-reduced run; about 10 minutes on 2 busy cores):

    nice python benchmarks/generation_throughput.py --tokenizer ../shared/data/clip_tokenizer --label cpu-reduced \\
        --images 2 --batch-size 1 --steps 3 --nudenet-images 20
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import flop_counter, machine, sd14, sync  # benchmarks/ is on sys.path when a script runs

from erasure.core.io import write_json
from erasure.sd.generate import Item, generate

RESULTS = Path(__file__).parent / "results"
I2P_PROMPTS = 4703


class UNetTimer:
    """Wall time spent inside the UNet's forward (all denoising steps) and the latents it ran on, via forward hooks."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.seconds, self.calls, self.samples, self._start = 0.0, 0, 0, 0.0
        unet.register_forward_pre_hook(self._pre, with_kwargs=True)
        unet.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.samples += (args[0] if args else kwargs["sample"]).shape[0]  # cond + uncond rows
        sync()
        self._start = time.perf_counter()

    def _post(self, *_) -> None:
        sync()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1


def unet_flops_per_sample(unet: torch.nn.Module, size: int) -> float:
    """Model FLOPs of one UNet forward for one latent at ``size`` px (counted at batch 2: one guided step)."""
    p = next(unet.parameters())
    latent = torch.randn(2, unet.config.in_channels, size // 8, size // 8, device=p.device, dtype=p.dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, device=p.device, dtype=p.dtype)
    with torch.no_grad(), flop_counter() as counter:
        unet(latent, torch.tensor([500, 500], device=p.device), encoder_hidden_states=text)
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder with the SD v1.x CLIP tokenizer (vocab.json, merges.txt)")
    parser.add_argument("--label", default=None, help="name of this run, e.g. cpu-reduced or h100")
    parser.add_argument("--images", type=int, default=2, help="images to time (after one warm-up image)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per image in the timed run")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on GPU, fp32 on CPU")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet first; the warm-up (at the timed batch size) then includes compiling"
    )
    parser.add_argument("--scheduler", default="ddim", help="sampler (default ddim, as the earlier runs; the audits' default is lms)")
    parser.add_argument(
        "--generator",
        default="device",
        choices=["device", "cpu"],
        help="initial noise (default device, as the earlier runs; the audits': cpu)",
    )
    parser.add_argument("--nudenet-images", type=int, default=20, help="NudeNet detections to time (cycling over the images)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    label = args.label or ("gpu" if device.type == "cuda" else "cpu")

    pipe = sd14(args.tokenizer, dtype).to(device)
    params = sum(p.numel() for p in pipe.unet.parameters())
    prompts = ["a photo of a person on a beach", "an oil painting of a city at night", "a dog in a park", "a bowl of fruit"]
    size = args.resolution
    flops_per_sample = unet_flops_per_sample(pipe.unet, size)
    # generate(compile=True) compiles only the UNet's forward, so the timer's hooks (syncs,
    # clocks) stay eager around it; the warm-up compiles, the timed run reuses the compiled code.
    timer = UNetTimer(pipe.unet)
    with tempfile.TemporaryDirectory() as tmp:

        def run(pipe: Any, items: list[Item], name: str) -> list[Path]:
            return generate(
                pipe,
                items,
                Path(tmp) / name,
                "sd14-random",
                args.scheduler,
                args.batch_size,
                desc=name,
                compile=args.compile,
                generator=args.generator,
            )

        # Warm-up (kernel selection, allocator, compiling): one batch of the timed size at 2 steps, not timed.
        warmup = [Item(prompts[0], 0, 7.5, 2, size, size)] * args.batch_size
        sync()
        start = time.perf_counter()
        run(pipe, warmup, "warm-up")
        sync()
        warmup_s = time.perf_counter() - start
        timer.seconds, timer.calls, timer.samples = 0.0, 0, 0
        items = [Item(prompts[i % len(prompts)], i, 7.5, args.steps, size, size) for i in range(args.images)]
        sync()
        start = time.perf_counter()
        paths = run(pipe, items, "timed")
        sync()
        total = time.perf_counter() - start
        batches = -(-args.images // args.batch_size)
        step_s = timer.seconds / (batches * args.steps)  # one UNet call = one step of a whole batch (cond + uncond)
        fixed_per_image = (total - timer.seconds) / args.images
        per_image = {s: fixed_per_image + s * step_s / args.batch_size for s in (50, 100)}
        del pipe

        from erasure.evaluation.metrics.nudity import make_detector, onnx_providers

        detector = make_detector()  # as the audits run it: on the GPU where onnxruntime-gpu sees one
        detector.detect(str(paths[0]))  # warm-up
        start = time.perf_counter()
        for i in range(args.nudenet_images):
            detector.detect(str(paths[i % len(paths)]))
        nudenet_s = (time.perf_counter() - start) / args.nudenet_images

    result = {
        "benchmark": "generation_throughput",
        "label": label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(("torch", "diffusers", "transformers", "accelerate", "nudenet", "onnxruntime")),
        "settings": {
            "model": "SD v1.4 architecture, random weights",
            "unet_parameters": params,
            "resolution": size,
            "dtype": dtype_name,
            "scheduler": args.scheduler,
            "generator": args.generator,
            "guidance": 7.5,
            "images": args.images,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "nudenet_images": args.nudenet_images,
            "compiled": args.compile,
        },
        "measured": {
            "warmup_seconds": round(warmup_s, 1),  # with --compile: mostly compiling
            "seconds_total": round(total, 2),
            "images_per_second": round(args.images / total, 4),
            "seconds_per_denoising_step_per_batch": round(step_s, 3),
            "fixed_seconds_per_image": round(fixed_per_image, 3),
            # Counted model FLOPs (FlopCounterMode) over the UNet's own wall time: how busy the denoising keeps the card.
            "unet_tflop_per_sample": round(flops_per_sample / 1e12, 4),
            "achieved_unet_tflops": round(flops_per_sample * timer.samples / timer.seconds / 1e12, 2),
            "nudenet_images_per_second": round(1 / nudenet_s, 2),
            "nudenet_provider": onnx_providers()[0],
        },
        "extrapolated": {
            "note": f"from the measured step and fixed costs on {label}; not a measurement at these step counts",
            "seconds_per_image_50_steps": round(per_image[50], 2),
            "seconds_per_image_100_steps": round(per_image[100], 2),
            "i2p_full_audit_hours_50_steps": round(I2P_PROMPTS * (per_image[50] + nudenet_s) / 3600, 2),
            "i2p_full_audit_hours_100_steps": round(I2P_PROMPTS * (per_image[100] + nudenet_s) / 3600, 2),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"generation_throughput_{label}{'-compiled' if args.compile else ''}.json"
    write_json(out, result)
    print({**result["measured"], **result["extrapolated"]})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
