"""The DDPM path's commands: ``erasure demo | config | train-ddpm | import-ddpm | train-classifier | mask | erase | evaluate``.

Each takes ``-c CONFIG.yaml`` (optional: the defaults are the embedded demo), ``--workdir``
and ``key=value`` overrides, e.g. ``erasure erase -c configs/mnist.yaml unlearn.alpha=0.5``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from erasure.core.cli import config_command, load
from erasure.core.config import to_yaml
from erasure.ddpm.config import Config


def cmd_config(args: argparse.Namespace) -> None:
    print(to_yaml(load(args)), end="")


def cmd_train_ddpm(args: argparse.Namespace) -> None:
    config = load(args)  # first: a bad config fails before torch is even imported
    from erasure.ddpm.pipeline import train_base

    print(f"base model: {train_base(config)}")


def cmd_import_ddpm(args: argparse.Namespace) -> None:
    config = load(args)
    from erasure.ddpm.reference import import_reference

    print(f"base model: {import_reference(config, args.checkpoint)}")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    config = load(args)
    from erasure.ddpm.pipeline import train_judge

    print(f"classifier: {train_judge(config)}")


def cmd_mask(args: argparse.Namespace) -> None:
    config = load(args)
    from erasure.ddpm.pipeline import compute_mask

    out = Path(args.out or Path(config.workdir) / "masks" / f"salun-forget{config.unlearn.forget_class}.safetensors")
    mask = compute_mask(config, out)
    print(f"mask: {out} ({100 * mask.kept_fraction:.1f}% of weights may change)")


def cmd_erase(args: argparse.Namespace) -> None:
    config = load(args)
    from erasure.ddpm.pipeline import erase

    for method in args.method or [config.unlearn.method]:
        print(f"{method}: {erase(config, method)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    config = load(args)
    from erasure.ddpm.evaluate import evaluate
    from erasure.evaluation.report import table

    report = evaluate(config, args.method)
    if not report:  # another process of an `accelerate launch` job: the main one reports
        return
    print("\n" + table(report))
    print(f"\nreport: {Path(config.workdir) / 'eval' / 'report.md'}")


def cmd_demo(args: argparse.Namespace) -> None:
    config = load(args)
    from erasure.ddpm.demo import run_demo

    run_demo(config)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the DDPM commands (they sit at the top level: ``erasure erase``, ...)."""

    def add(name: str, func, help: str) -> argparse.ArgumentParser:  # noqa: A002
        return config_command(sub, name, func, help, Config, "YAML config (default: the embedded demo config)")

    add("demo", cmd_demo, "Offline demo: train a small DDPM on 8x8 digits, erase a class with SalUn, evaluate.")
    add("config", cmd_config, "Print the resolved config.")
    add("train-ddpm", cmd_train_ddpm, "Train (or resume) the class-conditional DDPM.")
    add("import-ddpm", cmd_import_ddpm, "Import a reference-code DDPM (its ckpt.pth) as this config's base model.").add_argument(
        "--checkpoint", required=True, help="the reference run's ckpts/ckpt.pth"
    )
    add("train-classifier", cmd_train_classifier, "Train the classifier that scores generated images.")
    add("mask", cmd_mask, "Compute and save a SalUn saliency mask for the forgotten class.").add_argument(
        "--out", help="mask file (.safetensors)"
    )
    add("erase", cmd_erase, "Erase unlearn.forget_class with one or more methods.").add_argument(
        "--method", action="append", help="salun, rl, ga, random or esd; repeat for several (default: unlearn.method)"
    )
    add("evaluate", cmd_evaluate, "Score the original and erased models: UA, retained accuracy, FID, grid.").add_argument(
        "--method", action="append", help="erased models to include (default: eval.methods)"
    )
