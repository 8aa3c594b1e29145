"""``erasure sd ...``: the Stable Diffusion commands.

Each takes ``-c CONFIG.yaml`` (an :class:`~erasure.sd.config.SDConfig`) and ``key=value``
overrides, e.g. ``erasure sd erase -c configs/sd/nudity_salun.yaml train.alpha=0.5``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from erasure.core.cli import config_command, load
from erasure.core.config import to_yaml
from erasure.sd.config import SDConfig


def cmd_config(args: argparse.Namespace) -> None:
    print(to_yaml(load(args)), end="")


def cmd_generate_data(args: argparse.Namespace) -> None:
    config = load(args)
    from erasure.core.loop import make_accelerator
    from erasure.sd.config import load_concept
    from erasure.sd.model import frozen_dtype, load_pipeline
    from erasure.sd.pipeline import training_sets

    concept = load_concept(config.concept)
    device = make_accelerator(config.device, config.mixed_precision).device
    pipe = load_pipeline(config.model.pretrained, config.model.revision, frozen_dtype(config.model.frozen_dtype, device)).to(device)
    sets = training_sets(config, concept, pipe, tuple(args.set or ["forget", "retain"]), device)
    for name, s in sets.items():
        print(f"{name}: {len(s.latents)} images -> {Path(config.workdir) / 'data' / name}")


def cmd_erase(args: argparse.Namespace) -> None:
    config = load(args)
    import dataclasses

    from erasure.sd.pipeline import erase

    for method in args.method or [config.method]:
        folder = erase(dataclasses.replace(config, method=method))
        print(f"{method}: {folder}")


def cmd_apply_delta(args: argparse.Namespace) -> None:
    from erasure.core.delta import apply_delta, delta_record
    from erasure.sd.model import load_pipeline, load_unet, save_pipeline

    pipe = load_pipeline(args.base)
    variant = delta_record(args.delta).get("unet_variant")
    if variant:  # the delta was made against that variant of the base's UNet (model.unet_variant)
        pipe.unet = load_unet(args.base, variant=variant)
        print(f"base UNet: the '{variant}' variant of {args.base}")
    pipe.unet.load_state_dict(apply_delta(pipe.unet.state_dict(), args.delta))
    save_pipeline(pipe, args.out)
    print(f"merged pipeline: {args.out}")


def cmd_tiny_pipeline(args: argparse.Namespace) -> None:
    import tempfile

    from erasure.sd.tiny import tiny_pipeline, tiny_xl_pipeline

    build = tiny_xl_pipeline if args.xl else tiny_pipeline
    with tempfile.TemporaryDirectory() as tokenizer_folder:
        build(tokenizer_folder, seed=args.seed).save_pretrained(args.out, safe_serialization=True)
    print(f"tiny random Stable Diffusion{' XL' if args.xl else ''} pipeline: {args.out}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``erasure sd`` and its subcommands."""
    sd = sub.add_parser("sd", help="Stable Diffusion: generate training data, erase with SalUn / ESD / FMN / UCE, apply deltas.")
    sd_sub = sd.add_subparsers(dest="sd_command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:  # noqa: A002
        config_help = "YAML run config, e.g. configs/sd/nudity_salun.yaml"
        return config_command(sd_sub, name, func, help, SDConfig, config_help, {"model": "model.pretrained"})

    add("config", cmd_config, "Print the resolved SD config.")
    add("generate-data", cmd_generate_data, "Generate the forget / retain training images with the base model (resumable).").add_argument(
        "--set", action="append", default=None, choices=["forget", "retain"], help="which set (default: both)"
    )
    add("erase", cmd_erase, "Erase the concept with one or more methods; writes a pipeline folder and a delta.").add_argument(
        "--method", action="append", help="salun, esd-x, esd-u, esd-all, esd-x-strict, fmn or uce; repeat for several (default: method)"
    )

    p = sd_sub.add_parser("apply-delta", help="Merge a delta onto its base model into a full pipeline folder.")
    p.add_argument("--base", required=True, help="the base pipeline (hub id or folder) the delta was made from")
    p.add_argument("--delta", required=True, help="delta.safetensors of an erasure run")
    p.add_argument("--out", required=True, help="output folder (the base's pipeline class, e.g. StableDiffusionPipeline, loads it)")
    p.set_defaults(func=cmd_apply_delta)

    p = sd_sub.add_parser("tiny-pipeline", help="Write a tiny random SD pipeline, to try every command offline in seconds.")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--xl", action="store_true", help="an SDXL pipeline (two text encoders, size conditioning)")
    p.set_defaults(func=cmd_tiny_pipeline)
