"""Grid sweeps over unlearning settings: ``erasure unlearn-classifier -c CONFIG --sweep unlearn.salun.lr=0.005,0.01``.

The reference tunes each method's lr (and SalUn's mask ratio) by grid search. A sweep
runs every point of a grid against one original model and one Retrain, each method's run
in ``{workdir}/sweep/{its settings}/{method}``, where its settings are the point's keys that
the method reads (so an interrupted sweep resumes, a finished run is reused, and a grid
crossing two methods' settings runs each method once per setting of its own). A point that
leaves a method at the config's own settings shares the table's run (``{workdir}/{method}``),
so ``benchmarks/classification.py``, which makes the table first, does not repeat it. It writes
``{workdir}/sweep.json`` and ``sweep.md``: one row per run, and the run selected for each
method.

Selection rule: for each method, the grid point with the smallest average gap to Retrain
(mean of |UA|, |RA|, |TA|, |MIA| differences; ties go to the first point in grid order).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.classification.config import ClassificationConfig
from erasure.classification.methods import get_method
from erasure.classification.metrics import METRICS, make_table
from erasure.core.config import with_overrides
from erasure.core.errors import ErasureError
from erasure.core.io import write_json, write_text
from erasure.core.stages import on_main_process

if TYPE_CHECKING:  # only for the annotation; run_sweep imports the pipeline when it runs, as before
    from erasure.classification.pipeline import Experiment

# Settings under unlearn. that every training method reads (they change every method's run).
COMMON = ("batch_size", "momentum", "weight_decay", "augment", "seed")


def parse_grid(entries: list[str]) -> list[tuple[str, list[str]]]:
    """``["unlearn.salun.lr=0.005,0.01"]`` -> ``[("unlearn.salun.lr", ["0.005", "0.01"])]`` (each value is YAML text)."""
    grid = []
    for entry in entries:
        if "=" not in entry:
            raise ErasureError(f"sweep entry '{entry}' is not of the form key=v1,v2,... (e.g. unlearn.salun.lr=0.005,0.01).")
        key, raw = (part.strip() for part in entry.split("=", 1))
        parts = key.split(".")
        if parts[0] != "unlearn" or len(parts) < 2 or parts[1] == "methods":
            raise ErasureError(
                f"sweep key '{key}' is not an unlearning setting; a sweep varies unlearn.<method>.<key> or unlearn.{{{','.join(COMMON)}}} "
                "(the original model and Retrain are shared by every point)."
            )
        if len(parts) == 2 and parts[1] not in COMMON:
            choices = f"unlearn.<method>.<key> or one of unlearn.{{{','.join(COMMON)}}}"
            raise ErasureError(f"sweep key '{key}' is not an unlearning setting; choose {choices}.")
        if len(parts) > 2:
            get_method(parts[1])  # a clear error for a misspelt method
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ErasureError(f"sweep entry '{entry}' has no values.")
        if key in (k for k, _ in grid):
            raise ErasureError(f"sweep key '{key}' appears twice.")
        grid.append((key, values))
    return grid


def grid_points(config: ClassificationConfig) -> list[tuple[str, ClassificationConfig]]:
    """Every point of ``config.sweep.grid`` as (label, config with that point's settings)."""
    grid = parse_grid(config.sweep.grid)
    base = dataclasses.replace(config, sweep=dataclasses.replace(config.sweep, grid=[]))
    points = []
    for combo in itertools.product(*(values for _, values in grid)):
        overrides = [f"{key}={v}" for (key, _), v in zip(grid, combo)]
        point = with_overrides(base, overrides)  # checked like any loaded config: a bad grid value is a clear error
        label = ",".join(o.removeprefix("unlearn.") for o in overrides)
        points.append((label, point))
    return points


def own_label(label: str, method: str) -> str:
    """The part of a grid point's label that ``method``'s run reads: its own keys and the common ones.

    A method's run depends on nothing else (see ``pipeline.method_stage``), so in a grid that
    crosses several methods' settings each distinct run is made once: ``salun.lr=0.01,rl.lr=0.1``
    -> ``salun.lr=0.01`` for SalUn.
    """
    parts = [part for part in label.split(",") if "." not in part.split("=", 1)[0] or part.startswith(f"{method}.")]
    return ",".join(parts)


def swept_methods(config: ClassificationConfig) -> list[str]:
    """The methods whose runs the grid changes, in ``unlearn.methods`` order (Retrain is never swept)."""
    keys = [key.split(".") for key, _ in parse_grid(config.sweep.grid)]
    if any(len(k) == 2 for k in keys):  # a common setting: every unlearning method
        return [m for m in config.unlearn.methods if m != "retrain"]
    named = {k[1] for k in keys}
    return [m for m in dict.fromkeys([*config.unlearn.methods, *sorted(named)]) if m in named and m != "retrain"]


def select(table: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each method, the sweep row with the smallest average gap to Retrain (first in grid order on ties)."""
    best: dict[str, dict[str, Any]] = {}
    for row in table:
        method = row.get("base_method")
        if method is None or row["avg_gap"] is None:
            continue
        if method not in best or row["avg_gap"] < best[method]["avg_gap"]:
            best[method] = row
    return best


def sweep_markdown(table: list[dict[str, Any]], selected: dict[str, dict[str, Any]]) -> str:
    """Every run of the sweep (selected ones marked), then the selection."""
    head = ["method", "point", *METRICS, "avg gap", "RTE (min)", "selected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    chosen = {id(r) for r in selected.values()}
    for row in table:
        cells = [str(row.get("base_method") or row["method"]), str(row.get("point") or "")]
        cells += [f"{row[m]:.2f}" + (f" ({row[f'gap_{m}']:.2f})" if row[f"gap_{m}"] is not None else "") for m in METRICS]
        cells.append(f"{row['avg_gap']:.2f}" if row["avg_gap"] is not None else "")
        cells.append(f"{row['RTE']:.2f}" if row.get("RTE") is not None else "")
        cells.append("yes" if id(row) in chosen else "")
        lines.append("| " + " | ".join(cells) + " |")
    rule = "Selected: for each method, the point with the smallest average gap to Retrain (ties: first in grid order)."
    picks = [f"- {m}: {r['point']} (avg gap {r['avg_gap']:.2f})" for m, r in selected.items()]
    return "\n".join(lines) + "\n\n" + rule + "\n" + "\n".join(picks) + "\n"


def run_sweep(
    config: ClassificationConfig,
    log: Callable[[str], None] = print,
    experiment: Experiment | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every grid point of ``config.sweep`` and write ``sweep.json`` / ``sweep.md``; return the report.

    The files are rewritten after every finished point (``points_done`` of ``points``), so a
    sweep cut short by a time limit still shows the rows it finished; ``on_point``, when
    given, receives that partial report too. ``experiment``: one already built for
    ``config`` (its data on the device), to reuse.
    """
    from erasure.classification.pipeline import Experiment, method_stage

    methods = swept_methods(config)
    if not methods:
        raise ErasureError(f"the sweep {config.sweep.grid} changes none of unlearn.methods={config.unlearn.methods}.")
    workdir = Path(config.workdir)
    experiment = experiment if experiment is not None else Experiment(config, log)
    rows: dict[str, dict[str, Any]] = {"original": experiment.original_metrics, "retrain": experiment.run_method(config, "retrain")}
    points = grid_points(config)

    def write(report: dict[str, Any], table: list[dict[str, Any]], selected: dict[str, dict[str, Any]]) -> None:
        write_json(workdir / "sweep.json", report)
        write_text(workdir / "sweep.md", sweep_markdown(table, selected))

    report: dict[str, Any] = {}
    for done, (label, point) in enumerate(points, 1):
        for name in methods:
            own = own_label(label, name)  # a run another point already made (same settings for this method) is not repeated
            if f"{name} [{own}]" in rows:
                continue
            if method_stage(point, name).fingerprint == method_stage(config, name).fingerprint:
                row = experiment.run_method(config, name)  # the config's own settings: the table's run, made or reused there
            else:
                row = experiment.run_method(point, name, workdir / "sweep" / own)
            rows[f"{name} [{own}]"] = {**row, "base_method": name, "point": own}
        table = make_table(rows)
        selected = select(table)
        report = {
            "workdir": str(workdir),
            "grid": config.sweep.grid,
            "rule": "smallest average gap to Retrain per method; ties: first in grid order",
            "points": len(points),
            "points_done": done,
            "sizes": experiment.sizes,
            "table": table,
            "selected": {m: {"point": r["point"], "avg_gap": r["avg_gap"]} for m, r in selected.items()},
        }
        on_main_process(functools.partial(write, report, table, selected))  # one process writes; the others wait for the files
        if on_point is not None:
            on_point(report)
    return report
