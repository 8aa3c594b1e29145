"""The ``erasure`` command line.

Every command takes ``-c CONFIG.yaml`` (optional: the defaults are the embedded demo) and
``key=value`` overrides, e.g. ``erasure erase -c configs/mnist.yaml unlearn.alpha=0.5``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erasure.config import Config, load_config, to_yaml
from erasure.errors import ErasureError


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "workdir", None):
        overrides.append(f"workdir={args.workdir}")
    return load_config(args.config, overrides)


def cmd_config(args: argparse.Namespace) -> None:
    print(to_yaml(_config(args)), end="")


def cmd_train_ddpm(args: argparse.Namespace) -> None:
    from erasure.stages import train_base

    print(f"base model: {train_base(_config(args))}")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from erasure.stages import train_judge

    print(f"classifier: {train_judge(_config(args))}")


def cmd_mask(args: argparse.Namespace) -> None:
    from erasure.stages import compute_mask

    config = _config(args)
    out = Path(args.out or Path(config.workdir) / "masks" / f"salun-forget{config.unlearn.forget_class}.safetensors")
    mask = compute_mask(config, out)
    print(f"mask: {out} ({100 * mask.kept_fraction:.1f}% of weights may change)")


def cmd_erase(args: argparse.Namespace) -> None:
    from erasure.stages import erase

    config = _config(args)
    for method in args.method or [config.unlearn.method]:
        print(f"{method}: {erase(config, method)}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from erasure.evaluate import evaluate
    from erasure.report import table

    config = _config(args)
    report = evaluate(config, args.method)
    print("\n" + table(report))
    print(f"\nreport: {Path(config.workdir) / 'eval' / 'report.md'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from erasure.demo import run_demo

    run_demo(_config(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per stage."""
    parser = argparse.ArgumentParser(prog="erasure", description="Erase classes and concepts from diffusion models, and measure it.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("-c", "--config", help="YAML config (default: the embedded demo config)")
        p.add_argument("--workdir", help="shortcut for workdir=...")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. unlearn.alpha=0.5")
        p.set_defaults(func=func)
        return p

    add("demo", cmd_demo, "Offline demo: train a small DDPM on 8x8 digits, erase a class with SalUn, evaluate.")
    add("config", cmd_config, "Print the resolved config.")
    add("train-ddpm", cmd_train_ddpm, "Train (or resume) the class-conditional DDPM.")
    add("train-classifier", cmd_train_classifier, "Train the classifier that scores generated images.")
    add("mask", cmd_mask, "Compute and save a SalUn saliency mask for the forgotten class.").add_argument(
        "--out", help="mask file (.safetensors)"
    )
    add("erase", cmd_erase, "Erase unlearn.forget_class with one or more methods.").add_argument(
        "--method", action="append", help="salun, rl, random or esd; repeat for several (default: unlearn.method)"
    )
    add("evaluate", cmd_evaluate, "Score the original and erased models: UA, retained accuracy, FID, grid.").add_argument(
        "--method", action="append", help="erased models to include (default: eval.methods)"
    )
    from erasure.sd.cli import add_parser as add_sd

    add_sd(sub)
    from erasure.audit_cli import add_parser as add_audit

    add_audit(sub)
    from erasure.classification.cli import add_parser as add_classification

    add_classification(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erasure`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ErasureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}. Rerun the same command to resume.", file=sys.stderr)
        return 130
    return 0
