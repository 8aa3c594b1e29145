"""Benchmark: erase classes from a class-conditional DDPM on MNIST or CIFAR-10, end to end.

One command trains the base DDPM and the judge classifier, erases each forget class with
every method in ``eval.methods`` (SalUn, RL, random mask, GA, ESD), evaluates each setting
(UA by the judge, retained-class generated accuracy, retained-class FID against real
images, by default the held-out split of the config), draws the grids, times each stage
and writes one JSON file (machine, versions, resolved settings, date, timings, a
per-setting table and the goal checks) plus the grids into
``benchmarks/results/``:

    python benchmarks/ddpm_erasure.py --config configs/mnist32.yaml \\
        --data-path ../shared/data/mnist/mnist.npz \\
        --fid-weights ../shared/data/fid/weights-inception-2015-12-05-torch-fidelity.pth \\
        --label cpu-reduced --forget-classes 0 train.steps=1200

Extra ``key=value`` arguments override the config, as on the ``erasure`` command line;
``--method-set esd:unlearn.batch_size=8`` overrides a key for one method only.
Finished stages (base, judge, each erasure, each model's samples) are reused, so an
interrupted benchmark resumes where it stopped; the base and erasure stages also resume
from their last checkpoint. The timings then cover only the work done in the last run,
and the JSON says which stages were reused.
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
from erasure.ddpm import evaluate as ddpm_evaluate
from erasure.ddpm.config import Config, load
from erasure.ddpm.evaluate import evaluate
from erasure.ddpm.pipeline import base_stage, erase, erase_stage, judge_stage, train_base, train_judge

RESULTS = Path(__file__).parent / "results"
# The goals for SalUn, checked (never tuned for) on every setting.
GOAL_UA = 0.99
GOAL_FID_RATIO = 1.1


def timed(name: str, timings: dict[str, dict[str, object]], done: bool, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    timings[name] = {"seconds": round(time.perf_counter() - start, 1), "reused": done}
    print(f"{name}: {timings[name]['seconds']} s{' (reused)' if done else ''}", flush=True)
    return out


def method_overrides(items: list[str]) -> dict[str, list[str]]:
    """``method:key=value`` items -> {method: [key=value, ...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise SystemExit(f"--method-set expects METHOD:key=value, got '{item}'")
        out.setdefault(method, []).append(kv)
    return out


def ahead(salun: dict, other: dict) -> bool:
    """SalUn is ahead of ``other``: it alone reaches the UA goal, or both do and SalUn's retained FID is lower."""
    s_ok, o_ok = salun["ua"] >= GOAL_UA, other["ua"] >= GOAL_UA
    if s_ok != o_ok:
        return s_ok
    return s_ok and salun["fid_retained"] < other["fid_retained"]


def goals(models: dict[str, dict]) -> dict[str, object]:
    """The goals for one setting, from the measured numbers."""
    if "salun" not in models:
        return {}
    salun, original = models["salun"], models["original"]
    ratio = salun["fid_retained"] / original["fid_retained"]
    return {
        "salun_ua_at_least_99": salun["ua"] >= GOAL_UA,
        "salun_fid_ratio": round(ratio, 3),
        "salun_fid_within_1.1x": ratio <= GOAL_FID_RATIO,
        "salun_ahead_of": {m: ahead(salun, s) for m, s in models.items() if m not in ("original", "salun", "ga")},
        "rule": "ahead = SalUn alone reaches UA >= 99%, or both do and SalUn's retained FID is lower",
    }


def rows(forget: int, report: dict, timings: dict) -> list[dict[str, object]]:
    """One table row per model of one forget-class setting."""
    original = report["models"]["original"]["fid_retained"]
    out = []
    for name, s in report["models"].items():
        t = timings.get(f"erase_{name}_forget{forget}", {})
        out.append(
            {
                "forget_class": forget,
                "model": name,
                "ua": round(100 * s["ua"], 1),
                "retained_accuracy": round(100 * s["retained_accuracy"], 1),
                "fid_retained": round(s["fid_retained"], 2),
                "fid_ratio": round(s["fid_retained"] / original, 3),
                "erase_seconds": t.get("seconds") if not t.get("reused") else None,
            }
        )
    return out


def markdown(table: list[dict[str, object]], fid_name: str) -> str:
    head = f"| forget | model | UA | retained acc. | FID retained ({fid_name}) | FID / original | erase time |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in table:
        secs = f"{r['erase_seconds']:.0f} s" if r["erase_seconds"] is not None else ""
        lines.append(
            f"| {r['forget_class']} | {r['model']} | {r['ua']:.1f}% | {r['retained_accuracy']:.1f}% | {r['fid_retained']:.2f} "
            f"| {r['fid_ratio']:.3f} | {secs} |"
        )
    return "\n".join(lines)


def evaluate_setting(config: Config, methods: list[str], own: dict[str, Config]) -> dict:
    """Evaluate one forget class; its samples and report are kept in ``eval-forget{c}`` so that
    evaluating the next class (which shares ``{workdir}/eval``) does not throw them away.

    ``own`` holds the configs of methods erased with per-method overrides: evaluate() looks
    every erasure up under one config, so it is pointed at each such method's own stage.
    """
    work = Path(config.workdir)
    keep = work / f"eval-forget{config.unlearn.forget_class}"
    cache = work / "eval" / "samples"
    if (keep / "samples").is_dir():  # put back this setting's cached samples (each is checked by its key)
        cache.mkdir(parents=True, exist_ok=True)
        for f in (keep / "samples").iterdir():
            shutil.copyfile(f, cache / f.name)
    original = ddpm_evaluate.erase_stage
    ddpm_evaluate.erase_stage = lambda cfg, method: original(own.get(method, cfg), method)
    try:
        report = evaluate(config, methods)
    finally:
        ddpm_evaluate.erase_stage = original
    if keep.exists():
        shutil.rmtree(keep)
    shutil.copytree(work / "eval", keep, ignore=shutil.ignore_patterns("fid-cache"))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist32.yaml")
    parser.add_argument("--data-path", required=True, help="local dataset file or folder")
    parser.add_argument("--fid-weights", help="local torch-fidelity Inception weights (standard 2048-d FID)")
    parser.add_argument("--label", default=None, help="name of this scale, e.g. cpu-reduced or gpu")
    parser.add_argument("--forget-classes", type=int, nargs="+", help="the class-forgetting settings (default: unlearn.forget_class)")
    parser.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE", help="override a key for one method")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    overrides = [f"data.path={args.data_path}", *args.overrides]
    if args.fid_weights:
        overrides += ["eval.fid.features=inception", f"eval.fid.weights={args.fid_weights}"]
    per_method = method_overrides(args.method_set)
    config = load(args.config, overrides)
    methods = config.eval.methods
    forget_classes = args.forget_classes or [config.unlearn.forget_class]
    label = args.label or ("gpu" if torch.cuda.is_available() else "cpu")
    name = f"ddpm_erasure_{Path(args.config).stem}_{label}"
    RESULTS.mkdir(parents=True, exist_ok=True)

    timings: dict[str, dict[str, object]] = {}
    timed("train_ddpm", timings, base_stage(config).done(), train_base, config)
    timed("train_classifier", timings, judge_stage(config).done(), train_judge, config)

    settings, table = [], []
    for c in forget_classes:
        setting = load(args.config, [*overrides, f"unlearn.forget_class={c}"])
        for method in methods:
            mconfig = load(args.config, [*overrides, f"unlearn.forget_class={c}", *per_method.get(method, [])])
            done = erase_stage(mconfig, method).done()
            timed(f"erase_{method}_forget{c}", timings, done, erase, mconfig, method)
        own = {m: load(args.config, [*overrides, f"unlearn.forget_class={c}", *extra]) for m, extra in per_method.items()}
        report = timed(f"evaluate_forget{c}", timings, False, evaluate_setting, setting, methods, own)
        grid = RESULTS / (f"{name}_grid.png" if len(forget_classes) == 1 else f"{name}_forget{c}_grid.png")
        shutil.copyfile(Path(setting.workdir) / f"eval-forget{c}" / "grid.png", grid)
        settings.append({"forget_class": c, "report": report, "goals": goals(report["models"]), "grid": grid.name})
        table += rows(c, report, timings)

    fid_name = settings[0]["report"]["fid_features"]
    print(markdown(table, fid_name))
    for s in settings:
        print(f"forget {s['forget_class']}: {json.dumps(s['goals'])}")
    result = {
        "benchmark": "ddpm_erasure",
        "label": label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(("torch", "diffusers", "accelerate", "torch-fidelity", "safetensors")),
        "timings": timings,
        "table": table,
        "table_markdown": markdown(table, fid_name),
        "settings_results": settings,
        "base_model": json.loads((base_stage(config).folder / "done.json").read_text()),
        "classifier": json.loads((judge_stage(config).folder / "done.json").read_text()),
        "method_overrides": per_method,
        "settings": to_dict(config),
    }
    write_json(RESULTS / f"{name}.json", result)
    print(f"wrote {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main()
