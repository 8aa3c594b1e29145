"""Repeated trials of a table: ``erasure unlearn-classifier -c CONFIG --trials 3``.

One table is one draw of the unlearning randomness: batch order, crops and flips, RL's and
SalUn's random labels, IU's retain samples, and Retrain's initialization and batches. A gap
between two methods smaller than that draw-to-draw spread says nothing. Trial k runs Retrain
and every method again with ``retrain.seed`` and ``unlearn.seed`` raised by k, on the same
original model and forget set; trial 0 is the table itself (its runs are reused), trial k > 0
lives in ``{workdir}/trials/seed+{k}/{method}``. Finished runs are reused and an interrupted
one resumes.

It writes ``{workdir}/trials.json`` and ``trials.md`` after every trial: each trial's table,
and per method the mean and the sample standard deviation over the trials of each metric,
of its gap to the same trial's Retrain, and of the average gap.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.classification.config import ClassificationConfig
from erasure.classification.metrics import METRICS, make_table
from erasure.core.config import with_overrides
from erasure.core.errors import ErasureError
from erasure.core.io import write_json, write_text
from erasure.core.stages import on_main_process

if TYPE_CHECKING:
    from erasure.classification.pipeline import Experiment

# What a trial's table holds per method, summarized over the trials.
COLUMNS = (*METRICS, *(f"gap_{m}" for m in METRICS), "avg_gap", "RTE")


def trial_config(config: ClassificationConfig, k: int) -> ClassificationConfig:
    """Trial ``k``'s settings: Retrain's and the unlearning runs' seeds raised by ``k`` (trial 0 is ``config``)."""
    return with_overrides(config, [f"retrain.seed={config.retrain.seed + k}", f"unlearn.seed={config.unlearn.seed + k}"])


def summarize(tables: list[list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per method and column, the mean and sample standard deviation over the trials' tables (std None for one trial)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in tables[0]:
        method = row["method"]
        rows = [next(r for r in table if r["method"] == method) for table in tables]
        out[method] = {}
        for column in COLUMNS:
            values = [r[column] for r in rows if r.get(column) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else None
                out[method][column] = {"mean": statistics.fmean(values), "std": std}
    return out


def trials_markdown(summary: dict[str, dict[str, dict[str, float | None]]], trials: int) -> str:
    """Mean ± standard deviation of each metric, the average gap to Retrain and the RTE."""

    def cell(stat: dict[str, float | None] | None) -> str:
        if stat is None:
            return ""
        return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if stat["std"] is not None else "")

    head = ["method", *METRICS, "avg gap", "RTE (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, stats in summary.items():
        cells = [method, *(cell(stats.get(m)) for m in METRICS), cell(stats.get("avg_gap")), cell(stats.get("RTE"))]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"Mean ± sample standard deviation over {trials} trial(s) (retrain.seed and unlearn.seed + k); one original model."
    return "\n".join(lines) + "\n\n" + note + "\n"


def run_trials(
    config: ClassificationConfig,
    trials: int,
    log: Callable[[str], None] = print,
    experiment: Experiment | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``trials`` trials of the table and write ``trials.json`` / ``trials.md``; return the report.

    Retrain runs in every trial, listed in ``unlearn.methods`` or not: each trial's gaps are
    to its own Retrain. The files are rewritten after every trial (``trials_done``), and
    ``on_trial`` receives that report too, so a run cut short keeps the trials it finished.
    """
    from erasure.classification.pipeline import Experiment

    if trials < 1:
        raise ErasureError(f"--trials must be at least 1, got {trials}.")
    workdir = Path(config.workdir)
    experiment = experiment if experiment is not None else Experiment(config, log)
    methods = ["retrain", *(m for m in config.unlearn.methods if m != "retrain")]
    tables: list[list[dict[str, Any]]] = []
    report: dict[str, Any] = {}

    def write(report: dict[str, Any]) -> None:
        write_json(workdir / "trials.json", report)
        write_text(workdir / "trials.md", trials_markdown(report["summary"], report["trials_done"]))

    for k in range(trials):
        point, root = (config, None) if k == 0 else (trial_config(config, k), workdir / "trials" / f"seed+{k}")
        rows = {"original": experiment.original_metrics}
        for name in methods:
            rows[name] = experiment.run_method(point, name, root)
        tables.append(make_table(rows))
        report = {
            "workdir": str(workdir),
            "trials": trials,
            "trials_done": k + 1,
            "varied": "retrain.seed and unlearn.seed + k; the original model and the forget set are shared",
            "sizes": experiment.sizes,
            "summary": summarize(tables),
            "tables": tables,
        }
        on_main_process(functools.partial(write, report))
        if on_trial is not None:
            on_trial(report)
    return report
