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
import errno
import os
import sys

from erasure import __version__
from erasure.core.errors import ErasureError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: every path's subcommands."""
    from erasure.classification.cli import add_parser as add_classification
    from erasure.ddpm.cli import add_parser as add_ddpm
    from erasure.evaluation.cli import add_card_parser as add_card
    from erasure.evaluation.cli import add_parser as add_evaluation
    from erasure.sd.cli import add_parser as add_sd

    parser = argparse.ArgumentParser(prog="erasure", description="Erase classes and concepts from diffusion models, and measure it.")
    parser.add_argument("--version", action="version", version=f"erasure {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also accepted after the command)")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug belongs to the root parser, but people add it at the end of a failing command.
    debug = "--debug" in argv
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    args.debug = args.debug or debug
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


# What to do about an OS error, by errno; the message always names the path.
_FIXES = {
    errno.EACCES: "check the permissions of that path, or write somewhere else (--workdir / --out)",
    errno.EPERM: "check the permissions of that path, or write somewhere else (--workdir / --out)",
    errno.EROFS: "that file system is read-only; write somewhere else (--workdir / --out)",
    errno.ENOSPC: "the disk is full; free some space or write to another disk (--workdir / --out), then rerun to resume",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write to another disk, then rerun to resume",
    errno.ENOTDIR: "a part of that path is a file, not a folder; choose another path (--workdir / --out) or move the file",
    errno.EEXIST: "a file is in the way of a folder there; choose another path or move the file",
    errno.EISDIR: "that is a folder where a file is expected; give a file path",
    errno.ENOENT: "it does not exist; check the path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer workers",
}


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: what failed, on which path, and how to fix it."""
    paths = " -> ".join(f"'{p}'" for p in (e.filename, e.filename2) if p is not None) or "(no path given)"
    reason = e.strerror or str(e) or type(e).__name__
    fix = _FIXES.get(e.errno, "check the path and the disk, then rerun (--debug shows the traceback)")
    return f"{reason}: {paths}. Fix: {fix}."


def close_process_group() -> None:
    """After a successful multi-process command: wait for every rank, then close the process group.

    A rank that exits while its process group (and gloo's threads) still live can abort at
    interpreter shutdown ("terminate called without an active exception"), failing a job
    whose work is done.
    """
    if "torch" not in sys.modules:
        return  # a command that never loaded torch has no process group (and need not pay for the import)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``erasure`` console script: the one error boundary.

    A user-fixable problem (ErasureError) or an OS error (permissions, a full disk, a path
    that is a file) becomes one line on stderr and exit code 2; ``--debug`` shows the
    traceback instead. Anything else is a bug and keeps its traceback.
    """
    args = parse(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under `accelerate launch` every rank runs the command; results are printed once, by rank 0.
        # Errors still reach stderr from the rank that met them.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    try:
        args.func(args)
        close_process_group()
    except ErasureError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if args.debug:
            raise
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}. Rerun the same command to resume.", file=sys.stderr)
        return 130
    return 0
