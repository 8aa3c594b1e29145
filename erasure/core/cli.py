"""The one way a command gets its config: ``-c FILE``, shortcut flags such as ``--workdir``, and ``key=value`` overrides.

Every path's commands (DDPM, SD, classification) are built with :func:`config_command`,
so they all read their config the same way; overrides may stand anywhere on the line
(see :func:`erasure.cli.main`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from erasure.core.config import load_config


def config_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], None],
    help: str,  # noqa: A002
    schema: type,
    config_help: str = "YAML config (default: the built-in defaults)",
    shortcuts: dict[str, str] | None = None,
) -> argparse.ArgumentParser:
    """A subcommand that loads a ``schema`` config; ``shortcuts`` maps flags to config keys (``workdir`` always)."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("-c", "--config", help=config_help)
    shortcuts = {"workdir": "workdir", **(shortcuts or {})}
    for flag, key in shortcuts.items():
        p.add_argument(f"--{flag}", help=f"shortcut for {key}=...")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. workdir=runs/x")
    p.set_defaults(func=func, config_schema=schema, config_shortcuts=shortcuts)
    return p


def load(args: argparse.Namespace) -> Any:
    """The config of a command built by :func:`config_command`: file (or defaults), shortcut flags, then overrides."""
    overrides = list(args.overrides)
    for flag, key in args.config_shortcuts.items():
        value = getattr(args, flag.replace("-", "_"), None)
        if value:
            overrides.append(f"{key}={value}")
    config = load_config(args.config, overrides, schema=args.config_schema)
    if getattr(config, "gpu_recipe", False) and config.device in ("auto", "cpu"):
        from erasure.core.loop import on_cpu  # only now: a bad config has already failed without torch

        if on_cpu(config.device):
            print(
                f"warning: '{args.config}' is a GPU recipe and this run is on the CPU, where it takes far longer "
                "(hours to days); reduce it with overrides, or run it on a GPU.",
                file=sys.stderr,
            )
    return config
