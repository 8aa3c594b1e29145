"""Run folders: one per stage (base model, classifier, each erasure), reused when finished.

A stage folder holds ``config.yaml`` (the resolved config), its outputs, a ``checkpoint/``
while it runs and ``done.json`` when it has finished. ``done.json`` records a fingerprint
of the config the stage depends on (:func:`config_fingerprint`): a finished stage with the
same fingerprint is reused, and one with a different fingerprint is an error rather than
an overwrite. Every path (DDPM, SD, classification) runs its stages through
:meth:`Stage.run`, the one lifecycle: reuse, begin, work, finish.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from erasure.core.config import fingerprint, to_yaml
from erasure.core.errors import ErasureError
from erasure.core.io import read_json, write_json, write_text
from erasure.core.saliency import Mask

# Settings that cannot change what a stage produces: where it runs, how often (and to which trackers) it logs or saves.
# They stay out of fingerprints, so a resumed or re-evaluated run need not repeat them.
RUN_ONLY_KEYS = frozenset({"workdir", "device", "checkpoint_every", "log_every", "log_with"})
FINGERPRINT_SCHEME = 2  # bump when the fingerprint rule changes; older done.json files say so clearly


def config_fingerprint(config: Any, sections: Iterable[str] | None = None, skip: Iterable[str] = (), **extra: Any) -> str:
    """A hash of everything in ``config`` a stage's output can depend on.

    Derived, not listed: the whole resolved config (or only its top-level ``sections``),
    minus :data:`RUN_ONLY_KEYS` at any depth and the top-level keys in ``skip`` (e.g. other
    methods' sections), plus ``extra`` values. A setting added to a section later is
    covered without anyone remembering to add it here.
    """
    values = dataclasses.asdict(config)
    if sections is not None:
        values = {k: values[k] for k in sections}
    values = {k: v for k, v in values.items() if k not in set(skip)}
    extra = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in extra.items()}
    return fingerprint(_drop_run_only(values), extra, FINGERPRINT_SCHEME)


def _drop_run_only(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_run_only(v) for k, v in value.items() if k not in RUN_ONLY_KEYS}
    return value


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` job (or a plain process).

    Read from the launcher's environment rather than accelerate's state, so asking does not
    initialise that process-wide state with other settings than the stage's Accelerator.
    """
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """A barrier across the job's processes, once they have joined a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class Stage:
    """A stage's folder and the fingerprint of what it depends on."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.started = time.time()

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def done(self) -> bool:
        """True if finished with the same inputs; an error if finished with different ones."""
        marker = self.folder / "done.json"
        if not marker.is_file():
            return False
        previous = read_json(marker).get("fingerprint")
        if previous != self.fingerprint and read_json(marker).get("fingerprint_scheme") != FINGERPRINT_SCHEME:
            raise ErasureError(
                f"'{self.folder}' was finished by an older version of erasure, whose settings fingerprint "
                "cannot be compared with this one. Its outputs are still there to read; to redo the stage "
                "here, delete the folder (or use another workdir)."
            )
        if previous != self.fingerprint:
            raise ErasureError(
                f"'{self.folder}' already holds a finished run with different settings "
                f"(fingerprint {previous}, now {self.fingerprint}). Use another workdir, or delete the folder to redo it."
            )
        return True

    def finished(self) -> bool:
        """True if the folder holds a finished run, whatever its settings (they are in its config.yaml)."""
        return (self.folder / "done.json").is_file()

    def begin(self, config: Any) -> None:
        """Create the folder and save the resolved config into it (main process only)."""
        if is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text(self.folder / "config.yaml", to_yaml(config))
        self.started = time.time()

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the stage finished (with the wall time of the run that finished it) and drop its checkpoint.

        The main process writes; every process then waits, so no rank reads outputs before they exist.
        """
        if is_main_process():
            seconds = round(time.time() - self.started, 1)
            record = {"fingerprint": self.fingerprint, "fingerprint_scheme": FINGERPRINT_SCHEME, "seconds": seconds, **summary}
            write_json(self.folder / "done.json", record)
            shutil.rmtree(self.checkpoint, ignore_errors=True)
        wait_for_everyone()

    def run(self, config: Any, work: Callable[[], dict[str, Any]]) -> bool:
        """The stage lifecycle: reuse a finished run, else begin, ``work()``, finish with its summary.

        ``work`` writes the outputs (main process) and returns the summary for ``done.json``.
        Returns True if the work ran, False if a finished run was reused.
        """
        if self.done():
            return False
        self.begin(config)
        self.finish(work())
        return True


def shared_mask(stage: Stage, accelerator: Accelerator, model: torch.nn.Module, make: Callable[[], Mask | None]) -> Mask | None:
    """The stage's mask, made once by the main process and loaded by every process.

    All ranks of a multi-GPU job must train the same weights, so they share one file; a
    resumed run keeps the mask it started with instead of recomputing it.
    """
    path = stage.folder / "mask.safetensors"
    resuming = (stage.checkpoint / "state.json").is_file() and path.is_file()
    if accelerator.is_main_process and not resuming:
        path.unlink(missing_ok=True)
        mask = make()
        if mask is not None:
            mask.save(path)
    accelerator.wait_for_everyone()
    return Mask.load(path, model) if path.is_file() else None
