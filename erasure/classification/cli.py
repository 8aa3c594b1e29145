"""``erasure unlearn-classifier``: the classification-unlearning table from one config."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from erasure.classification.config import ClassificationConfig
from erasure.core.cli import config_command, load
from erasure.core.config import to_yaml
from erasure.core.errors import ErasureError


def cmd_unlearn_classifier(args: argparse.Namespace) -> None:
    """Run (or resume) every method of the table and print it; with a sweep grid or --trials, run those instead."""
    config = load(args)
    if args.sweep:  # added to the config's own grid, then checked like it
        config.sweep.grid = [*config.sweep.grid, *args.sweep]
        config.validate()
    if args.trials is not None and config.sweep.grid:  # (run_trials checks the count itself)
        raise ErasureError("--trials and a sweep are two different runs; give one of them.")
    if args.print_config:
        print(to_yaml(config), end="")
        return
    from erasure.classification.pipeline import run_table
    from erasure.core.stages import is_main_process

    start = time.time()
    workdir = Path(config.workdir)
    if args.trials is not None:
        from erasure.classification.trials import run_trials

        run_trials(config, args.trials)
        shown, note = workdir / "trials.md", "(+ trials.json, every trial's table)"
    elif config.sweep.grid:
        from erasure.classification.sweep import run_sweep

        rows = len(run_sweep(config)["table"])
        shown, note = workdir / "sweep.md", f"(+ sweep.json), {rows} rows"
    else:
        run_table(config)
        shown, note = workdir / "results.md", "(+ results.json)"
    if not is_main_process():  # under accelerate launch every process runs this; the main one prints
        return
    print("\n" + shown.read_text(), end="")
    print(f"{shown.stem}: {shown} {note}")
    print(f"done in {time.time() - start:.0f} s")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``unlearn-classifier`` subcommand."""
    help_text = "Classification unlearning (ResNet-18): original model, Retrain, FT, RL, GA, IU, l1-sparse, SalUn; UA/RA/TA/MIA/RTE table."
    config_help = "YAML config, e.g. configs/classification/cifar10_random10.yaml (default: tiny digits run)"
    p = config_command(subparsers, "unlearn-classifier", cmd_unlearn_classifier, help_text, ClassificationConfig, config_help)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="grid over an unlearning setting (repeatable; adds to sweep.grid), e.g. unlearn.salun.lr=0.005,0.01,0.013,0.02",
    )
    p.add_argument(
        "--trials",
        type=int,
        metavar="N",
        help="run the table N times, retrain.seed and unlearn.seed + 0..N-1, and report each metric's mean and spread",
    )
    return p
