"""Run folders: one per stage (base model, classifier, each erasure), reused when finished.

A stage folder holds ``config.yaml`` (the resolved config), its outputs, a ``checkpoint/``
while it runs and ``done.json`` when it has finished. ``done.json`` records a fingerprint
of the config sections the stage depends on: a finished stage with the same fingerprint
is reused, and one with a different fingerprint is an error rather than an overwrite.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from erasure.core.config import to_yaml
from erasure.core.errors import ErasureError
from erasure.core.io import read_json, write_json, write_text
from erasure.core.saliency import Mask


class Stage:
    """A stage's folder and the fingerprint of what it depends on."""

    def __init__(self, folder: str | Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def done(self) -> bool:
        """True if finished with the same inputs; an error if finished with different ones."""
        marker = self.folder / "done.json"
        if not marker.is_file():
            return False
        previous = read_json(marker).get("fingerprint")
        if previous != self.fingerprint:
            raise ErasureError(
                f"'{self.folder}' already holds a finished run with different settings "
                f"(fingerprint {previous}, now {self.fingerprint}). Use another workdir, or delete the folder to redo it."
            )
        return True

    def begin(self, config: Any) -> None:
        """Create the folder and save the resolved config into it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(self.folder / "config.yaml", to_yaml(config))
        self.started = time.time()

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the stage finished (with the wall time of the run that finished it) and drop its checkpoint."""
        seconds = round(time.time() - self.started, 1)
        write_json(self.folder / "done.json", {"fingerprint": self.fingerprint, "seconds": seconds, **summary})
        shutil.rmtree(self.checkpoint, ignore_errors=True)


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
