"""Benchmark: the classification-unlearning table (ResNet-18, CIFAR-10) from one config.

Runs the original model, Retrain and every unlearning method of the config through
``erasure.classification.pipeline.run_table`` and writes one JSON file with the machine,
library versions, resolved settings, date, timings and the table (UA, RA, TA, MIA, RTE
and each metric's gap to Retrain) into ``benchmarks/results/``.

    # full size, one GPU (reference recipe: 182 + 160 epochs; see also *_fast.yaml)
    python benchmarks/classification.py --config configs/classification/cifar10_random10.yaml \\
        --data-path ../shared/data/cifar10/cifar10_full_jpeg_q75.npz --label gpu-full

Extra ``key=value`` arguments override the config, as on the ``erasure`` command line.
Finished stages are reused, so an interrupted benchmark resumes where it stopped (the
JSON then marks which stages were reused and the total time covers the last run only).
The JSON is written once the table is done and again after every sweep point
(``sweep.points_done`` of ``sweep.points``) or trial (``trials.trials_done``, with
``--trials N``), so a run stopped by a time limit keeps them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from erasure.classification.config import ClassificationConfig
from erasure.classification.metrics import markdown
from erasure.classification.pipeline import Experiment, method_stage, original_stage, run_table
from erasure.classification.sweep import run_sweep
from erasure.classification.trials import run_trials
from erasure.core.config import load_config, to_dict
from erasure.core.io import write_json, write_text

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    info["versions"] = {p: version(p) for p in ("torch", "torchvision", "accelerate", "safetensors", "scikit-learn")}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/classification/cifar10_random10.yaml")
    parser.add_argument("--data-path", help="local dataset file or folder (default: the config's data.path or a download)")
    parser.add_argument("--label", default=None, help="name of this scale, e.g. cpu-reduced or gpu-full")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown (default benchmarks/results)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...", help="also run this grid (as the CLI's --sweep)")
    parser.add_argument("--trials", type=int, metavar="N", help="also run N trials of the table (as the CLI's --trials)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = ([f"data.path={args.data_path}"] if args.data_path else []) + args.overrides
    config = load_config(args.config, overrides, schema=ClassificationConfig)
    if args.sweep:  # added to the config's own grid, then checked like it (as the CLI does)
        config.sweep.grid = [*config.sweep.grid, *args.sweep]
        config.validate()
    label = args.label or ("gpu" if torch.cuda.is_available() else "cpu")
    stages = {"original": original_stage(config), **{m: method_stage(config, m) for m in config.unlearn.methods}}
    reused = {name: stage.done() for name, stage in stages.items()}

    start = time.perf_counter()
    experiment = Experiment(config)  # the data is loaded once, for the table and the sweep
    table = run_table(config, experiment=experiment)
    seconds = round(time.perf_counter() - start, 1)

    done = {name: json.loads((stage.folder / "done.json").read_text()) for name, stage in stages.items()}
    name = f"classification_{Path(args.config).stem}_{label}"
    result = {
        "benchmark": "classification",
        "label": label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "total_seconds": seconds,
        "reused": reused,
        "stages": {k: {key: v for key, v in d.items() if key != "fingerprint"} for k, d in done.items()},
        "table": table,
        "sizes": json.loads((Path(config.workdir) / "results.json").read_text())["sizes"],
        "settings": to_dict(config),
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The table is written before a sweep starts, so a run cut short by a time limit still leaves it.
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", markdown(table))
    print(markdown(table))
    if config.sweep.grid:

        def save_sweep(sweep: dict) -> None:  # after every grid point: a run cut short keeps the points it finished
            result["sweep"] = {k: sweep[k] for k in ("grid", "rule", "points", "points_done", "table", "selected")}
            result["total_seconds"] = round(time.perf_counter() - start, 1)
            write_json(out / f"{name}.json", result)
            write_text(out / f"{name}_sweep.md", (Path(config.workdir) / "sweep.md").read_text())

        run_sweep(config, experiment=experiment, on_point=save_sweep)  # the table's original model and Retrain, reused
        print("\n" + (out / f"{name}_sweep.md").read_text())
    if args.trials:

        def save_trials(trials: dict) -> None:  # after every trial: a run cut short keeps the trials it finished
            result["trials"] = {k: trials[k] for k in ("trials", "trials_done", "varied", "summary", "tables")}
            result["total_seconds"] = round(time.perf_counter() - start, 1)
            write_json(out / f"{name}.json", result)
            write_text(out / f"{name}_trials.md", (Path(config.workdir) / "trials.md").read_text())

        run_trials(config, args.trials, experiment=experiment, on_trial=save_trials)  # trial 0: the table's runs, reused
        print("\n" + (out / f"{name}_trials.md").read_text())
    print(f"wrote {out / f'{name}.json'} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
