"""``erasure unlearn-classifier``: the classification-unlearning table from one config."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from erasure.classification.config import ClassificationConfig
from erasure.core.cli import config_command, load
from erasure.core.config import to_yaml


def cmd_unlearn_classifier(args: argparse.Namespace) -> None:
    """Run (or resume) every method of the table and print it; with a sweep grid, run the sweep instead."""
    config = load(args)
    if args.sweep:  # added to the config's own grid, then checked like it
        config.sweep.grid = [*config.sweep.grid, *args.sweep]
        config.validate()
    if args.print_config:
        print(to_yaml(config), end="")
        return
    from erasure.classification.metrics import markdown
    from erasure.classification.pipeline import run_table
    from erasure.core.stages import is_main_process

    start = time.time()
    main = is_main_process()  # under accelerate launch every process runs this; the main one prints
    if config.sweep.grid:
        from erasure.classification.sweep import run_sweep

        report = run_sweep(config)
        if not main:
            return
        print("\n" + (Path(config.workdir) / "sweep.md").read_text(), end="")
        print(f"sweep: {Path(config.workdir) / 'sweep.md'} (+ sweep.json), {len(report['table'])} rows")
        print(f"done in {time.time() - start:.0f} s")
        return
    table = run_table(config)
    if not main:
        return
    print("\n" + markdown(table))
    print(f"results: {Path(config.workdir) / 'results.md'} (+ results.json)")
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
    return p
