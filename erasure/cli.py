"""The ``erasure`` command line: one entry point that mounts each path's commands.

- DDPM (top level): ``demo``, ``config``, ``train-ddpm``, ``train-classifier``, ``mask``, ``erase``, ``evaluate``
- Stable Diffusion: ``erasure sd ...``
- evaluation: ``erasure audit ...``, ``fid``, ``grid``, ``report``
- classification: ``erasure unlearn-classifier``

Config-driven commands take ``-c CONFIG.yaml``, ``--workdir`` and ``key=value`` overrides
anywhere on the line.
"""

from __future__ import annotations

import argparse
import sys

from erasure import __version__
from erasure.core.errors import ErasureError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: every path's subcommands."""
    from erasure.classification.cli import add_parser as add_classification
    from erasure.core.card import add_parser as add_card
    from erasure.ddpm.cli import add_parser as add_ddpm
    from erasure.evaluation.cli import add_parser as add_evaluation
    from erasure.sd.cli import add_parser as add_sd

    parser = argparse.ArgumentParser(prog="erasure", description="Erase classes and concepts from diffusion models, and measure it.")
    parser.add_argument("--version", action="version", version=f"erasure {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_ddpm(sub)
    add_sd(sub)
    add_evaluation(sub)
    add_classification(sub)
    add_card(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key=value`` overrides are taken wherever they stand, also after options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erasure`` console script."""
    args = parse(argv)
    try:
        args.func(args)
    except ErasureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}. Rerun the same command to resume.", file=sys.stderr)
        return 130
    return 0
