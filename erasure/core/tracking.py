"""Experiment trackers for the training loop: TensorBoard, W&B, or any other tracker accelerate knows.

Every path's config has a top-level ``log_with`` (``none``, ``tensorboard``, ``wandb``, or a
comma-separated list). :func:`erasure.core.loop.train` then opens one tracker run per
training stage and logs what it writes to ``log.csv`` (loss and loss terms, lr, grad norm),
plus the stage's mask fraction and its optimization settings as hyper-parameters.

Why accelerate's tracker classes, but not ``Accelerator(log_with=...)``: an Accelerator
binds its trackers when it is constructed, and TensorBoard needs the logging directory
then; our stages build their Accelerator before they know where a given training run
writes, and one process runs several stages (``erasure demo``: base model, classifier,
erasure), each of which should log into its own folder. So :class:`TrackerRun` builds
accelerate's ``GeneralTracker`` objects itself (``TensorBoardTracker``, ``WandBTracker``,
...) with the stage folder, and drives their ``start`` / ``store_init_configuration`` /
``log`` / ``finish`` as ``Accelerator.init_trackers``, ``log`` and ``end_training`` would.

TensorBoard writes to ``{stage folder}/tensorboard``, so ``tensorboard --logdir runs/demo``
shows every stage of a run side by side; it works offline.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

from erasure.core.errors import ErasureError

NONE = "none"
# The package each tracker needs, for a helpful error when it is missing.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow", "aim": "aim",
            "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}  # fmt: skip
PROJECT = "erasure"  # the W&B (or other hosted tracker's) project name


def parse_log_with(log_with: str | list[str] | None) -> tuple[str, ...]:
    """The tracker names of a ``log_with`` value; () for none. Unknown or uninstalled trackers are errors."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if log_with is None:
        return ()
    items = log_with if isinstance(log_with, list) else str(log_with).split(",")
    names = tuple(dict.fromkeys(n.strip().lower() for n in items if n.strip() and n.strip().lower() != NONE))
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ErasureError(f"log_with={name!r} is not a tracker; choose none or one of: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}.")
        package = PACKAGES.get(name, name)
        # TensorBoard: torch.utils.tensorboard needs the tensorboard package (tensorboardX also serves accelerate).
        found = importlib.util.find_spec(package) is not None or (name == "tensorboard" and importlib.util.find_spec("tensorboardX"))
        if not found:
            raise ErasureError(f"log_with={name} needs the '{package}' package: pip install {package}")
    return names


def flat_values(values: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested settings as ``a.b: value`` pairs of the scalar types trackers accept (others as text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, dict):
            out.update(flat_values(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)  # None, lists, tuples
    return out


class TrackerRun:
    """The trackers of one training run; does nothing when ``names`` is empty or off the main process.

    Use as a context manager, so the trackers are finished (TensorBoard's events flushed)
    also when training stops with an error or an interruption.
    """

    def __init__(
        self, names: tuple[str, ...], folder: str | Path, run_name: str, hparams: dict[str, Any], main_process: bool = True
    ) -> None:
        self.trackers: list[Any] = []
        if not names or not main_process:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        folder = Path(folder)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls("tensorboard", folder)  # events in {folder}/tensorboard
            elif name == "wandb":
                tracker = cls(PROJECT, name=run_name, dir=str(folder))
            elif cls.requires_logging_directory:
                tracker = cls(run_name, folder)
            else:
                tracker = cls(run_name)
            tracker.start()
            tracker.store_init_configuration(flat_values(hparams))
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        """Scalars at ``step`` to every tracker."""
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        """Finish every tracker (flushes and closes TensorBoard's event file)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self) -> TrackerRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
