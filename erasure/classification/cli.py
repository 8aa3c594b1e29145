"""``erasure unlearn-classifier``: the classification-unlearning table from one config."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from erasure.classification.config import ClassificationConfig
from erasure.config import load_config, to_yaml


def load(args: argparse.Namespace) -> ClassificationConfig:
    """The config of a parsed command line: file (or the embedded default), ``--workdir``, then overrides."""
    overrides = list(args.overrides)
    if args.workdir:
        overrides.append(f"workdir={args.workdir}")
    config = load_config(args.config, overrides, schema=ClassificationConfig)
    if args.sweep:  # added to the config's own grid, then checked like it
        config.sweep.grid = [*config.sweep.grid, *args.sweep]
        config.validate()
    return config


def cmd_unlearn_classifier(args: argparse.Namespace) -> None:
    """Run (or resume) every method of the table and print it; with a sweep grid, run the sweep instead."""
    config = load(args)
    if args.print_config:
        print(to_yaml(config), end="")
        return
    from erasure.classification.metrics import markdown
    from erasure.classification.pipeline import run_table

    start = time.time()
    if config.sweep.grid:
        from erasure.classification.sweep import run_sweep

        report = run_sweep(config)
        print("\n" + (Path(config.workdir) / "sweep.md").read_text(), end="")
        print(f"sweep: {Path(config.workdir) / 'sweep.md'} (+ sweep.json), {len(report['table'])} rows")
        print(f"done in {time.time() - start:.0f} s")
        return
    table = run_table(config)
    print("\n" + markdown(table))
    print(f"results: {Path(config.workdir) / 'results.md'} (+ results.json)")
    print(f"done in {time.time() - start:.0f} s")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``unlearn-classifier`` subcommand."""
    help_text = "Classification unlearning (ResNet-18): original model, Retrain, FT, RL, GA, IU, l1-sparse, SalUn; UA/RA/TA/MIA/RTE table."
    p = subparsers.add_parser("unlearn-classifier", help=help_text, description=help_text)
    p.add_argument("-c", "--config", help="YAML config, e.g. configs/classification/cifar10_random10.yaml (default: tiny digits run)")
    p.add_argument("--workdir", help="shortcut for workdir=...")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="grid over an unlearning setting (repeatable; adds to sweep.grid), e.g. unlearn.salun.lr=0.005,0.01,0.013,0.02",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. forget.fraction=0.5")
    p.set_defaults(func=cmd_unlearn_classifier)
    return p
