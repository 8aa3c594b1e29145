"""``erasure demo``: the whole path on embedded data, offline, on a CPU, in minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from erasure.ddpm.config import Config
from erasure.ddpm.evaluate import evaluate
from erasure.ddpm.pipeline import erase, erase_stage, train_base, train_judge
from erasure.evaluation.report import table


def run_demo(config: Config) -> dict[str, Any]:
    """Train (or reuse) the base DDPM and classifier, erase one class with SalUn, evaluate."""
    t0 = time.time()
    workdir = Path(config.workdir)
    print(f"[1/4] base DDPM on '{config.data.name}' -> {workdir / 'ddpm'}")
    train_base(config)
    print(f"[2/4] classifier -> {workdir / 'classifier'}")
    train_judge(config)
    method = config.unlearn.method
    print(f"[3/4] erasing class {config.unlearn.forget_class} with {method}")
    erase(config, method)
    print("[4/4] evaluating the original and the erased model")
    report = evaluate(config, [method])
    if not report:  # another process of an `accelerate launch` job: the main one reports
        return report
    print("\n" + table(report) + "\n")
    stage = erase_stage(config, method).folder
    print(f"erased model: {stage / 'model'}")
    if (stage / "mask.safetensors").is_file():
        print(f"mask:         {stage / 'mask.safetensors'}")
    print(f"grid:         {workdir / 'eval' / 'grid.png'}")
    print(f"report:       {workdir / 'eval' / 'report.md'} (+ report.json)")
    print(f"done in {time.time() - t0:.0f} s")
    return report
