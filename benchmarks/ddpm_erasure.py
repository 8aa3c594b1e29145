"""Benchmark: erase one class from a class-conditional DDPM on MNIST or CIFAR-10.

Runs every stage (base DDPM, classifier, each erasure method, evaluation) from a local
data file, times each stage, and writes one JSON file with the machine, library
versions, resolved settings, date, timings and results, plus the comparison grid.

    python benchmarks/ddpm_erasure.py --config configs/mnist.yaml \\
        --data-path ../shared/data/mnist/mnist.npz \\
        --fid-weights ../shared/data/fid/weights-inception-2015-12-05-torch-fidelity.pth \\
        --label cpu-reduced train.steps=2000

Extra ``key=value`` arguments override the config, as on the ``erasure`` command line.
Finished stages are reused, so an interrupted benchmark resumes where it stopped (the
timings then cover only the work done in the last run; the JSON says which were reused).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from common import machine  # benchmarks/ is on sys.path when a script runs

from erasure.core.config import to_dict
from erasure.core.io import write_json
from erasure.ddpm.config import load
from erasure.ddpm.evaluate import evaluate
from erasure.ddpm.pipeline import base_stage, erase, erase_stage, judge_stage, train_base, train_judge

RESULTS = Path(__file__).parent / "results"


def timed(name: str, timings: dict[str, dict[str, object]], done: bool, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    timings[name] = {"seconds": round(time.perf_counter() - start, 1), "reused": done}
    print(f"{name}: {timings[name]['seconds']} s{' (reused)' if done else ''}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--data-path", required=True, help="local dataset file or folder")
    parser.add_argument("--fid-weights", help="local torch-fidelity Inception weights (standard 2048-d FID)")
    parser.add_argument("--label", default=None, help="name of this scale, e.g. cpu-reduced or gpu-full")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    overrides = [f"data.path={args.data_path}", *args.overrides]
    if args.fid_weights:
        overrides += ["eval.fid.features=inception", f"eval.fid.weights={args.fid_weights}"]
    config = load(args.config, overrides)
    methods = config.eval.methods
    label = args.label or ("gpu" if torch.cuda.is_available() else "cpu")

    timings: dict[str, dict[str, object]] = {}
    timed("train_ddpm", timings, base_stage(config).done(), train_base, config)
    timed("train_classifier", timings, judge_stage(config).done(), train_judge, config)
    for method in methods:
        timed(f"erase_{method}", timings, erase_stage(config, method).done(), erase, config, method)
    report = timed("evaluate", timings, False, evaluate, config, methods)

    name = f"ddpm_erasure_{config.data.name}_{label}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(config.workdir) / "eval" / "grid.png", RESULTS / f"{name}_grid.png")
    result = {
        "benchmark": "ddpm_erasure",
        "label": label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(("torch", "diffusers", "accelerate", "torch-fidelity", "safetensors")),
        "timings": timings,
        "results": report,
        "base_model": json.loads((base_stage(config).folder / "done.json").read_text()),
        "settings": to_dict(config),
    }
    write_json(RESULTS / f"{name}.json", result)
    print(f"wrote {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main()
