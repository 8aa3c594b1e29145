"""`make gpu-check`: the first command on a GPU machine. Does everything work on CUDA, and how fast is it?

Runs, each part in its own process with its own time limit, and writes one JSON summary
(pass/fail, seconds and figures per part, machine and versions):

1. ``tests``      - the test suite but the tests marked slow (``--all-tests``: all); tests that touch a device run
                    on CUDA when one is present, in parallel where pytest-xdist is installed. They run beside
                    parts 2-5, which share the GPU with them (``shared_gpu_with`` in the summary: their seconds
                    are not timings); 6-9 then run alone
2. ``demo``       - ``erasure demo`` (bf16 base DDPM, then the fp32 judge, in one process)
3. ``ddpm-bf16``  - a bf16 ESD erase in the demo's workdir with its trajectory eager (``unlearn.esd_cuda_graph=false``),
                    then through CUDA graphs (the default; forget class 1)
4. ``sd-tiny``    - tiny random SD and SDXL pipelines on CUDA: SalUn, FMN (with its textual inversion) and
                    ESD-x on bf16 weights (SDXL: SalUn, ESD-x) erases, generation, a NudeNet audit and an
                    adversarial-prompt attack
5. ``classification`` - ``erasure unlearn-classifier`` on its embedded default
6. ``sd-step``    - the SD v1.4 SalUn step at batch 8 / 512 px: fp32 eager (the reference regime) and
                    bf16 eager, then with ``--compile`` bf16 compiled (``benchmarks/sd_training.py``)
7. ``esd-step``   - the SD v1.4 ESD-x step at batch 1 (the reference's), trajectory included: fp32 and bf16 eager,
                    and both with the trajectory through CUDA graphs (``esd.cuda_graph``)
8. ``generation`` - SD v1.4 images/s at 512 px through the audit engine (``benchmarks/generation_throughput.py``)
                    at batch 8 and at batch 32 (where ``--batch-size auto`` starts), fp16 DDIM, then at 32 with the
                    audits' defaults (bf16, LMS, noise drawn on the CPU); with ``--compile`` also compiled
9. ``cifar10-fast`` - with ``--cifar10 FILE``: the CIFAR-10 fast-recipe table (original, Retrain, RL, SalUn)

The SD benchmarks need the SD v1.x CLIP tokenizer (``--tokenizer``; the run skips them
without one). On a machine whose image lacks diffusers, torch-fidelity or nudenet, pass
``--wheels DIR`` (see ``benchmarks/gpu_wheels.sh``): they are installed into a temporary
folder first, without network. Budget: 8 minutes on one H100; ``--skip`` drops parts.

GPU time is scarce, so nothing measured is lost to a time limit: the summary is rewritten
(atomically) after every part; ``--budget SECONDS`` caps the whole run, each part getting at
most the time left; and the result files the parts write (``sd_training_*``,
``generation_throughput_*``, ...) are copied beside the summary. The summary goes to
``--out``, by default ``$OUT/gpu_check.json`` where ``OUT`` names a folder (the ``device``
tool's, whose files come back) and ``benchmarks/results/gpu_check.json`` otherwise.

    python benchmarks/gpu_check.py --wheels .whl --tokenizer .gpu-data/clip_tokenizer --out gpu-check.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PARTS = ["tests", "demo", "ddpm-bf16", "sd-tiny", "classification", "sd-step", "esd-step", "generation", "cifar10-fast"]
SHARE_THE_GPU = ["demo", "ddpm-bf16", "sd-tiny", "classification"]  # run beside the tests: their seconds are not timings


def run(cmd: list[str], env: dict[str, str], timeout: int, log: Path) -> tuple[bool, float, str]:
    """Run one command; returns (passed, seconds, the tail of its output).

    At ``timeout`` less a grace period the command is interrupted (SIGINT) rather than killed,
    so what it did is not lost: pytest still prints the failures so far, and erasure's jobs
    stop as after Ctrl-C. Only a command still running at ``timeout`` is killed.
    """
    start, grace = time.time(), min(30, timeout // 4)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout - grace)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        output += f"\ntimed out after {timeout} s"
    log.write_text(output)
    return proc.returncode == 0, round(time.time() - start, 1), output[-1500:]


def install_wheels(wheels: Path) -> str:
    """Install a folder of wheels into a temporary site folder (no network); returns it for PYTHONPATH."""
    site = Path(tempfile.mkdtemp(prefix="erasure-site-"))
    files = [str(p) for p in sorted(wheels.glob("*.whl"))]
    if files:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site), *files], check=True)
    return str(site)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install first (diffusers, torch-fidelity, nudenet)")
    parser.add_argument("--tokenizer", type=Path, help="SD v1.x CLIP tokenizer folder, for the SD benchmarks")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS) / "gpu_check.json")
    parser.add_argument("--budget", type=float, help="seconds for the whole run; a part gets at most the time left, none under 20 s")
    parser.add_argument("--skip", nargs="*", default=[], choices=PARTS)
    parser.add_argument(
        "--all-tests", action="store_true", help="also the tests marked slow (CPU multi-process jobs, notebooks, CLI end-to-end runs)"
    )
    parser.add_argument("--compile", action="store_true", help="also time the compiled SD step and generation (~2 min of compiling each)")
    parser.add_argument(
        "--cifar10",
        type=Path,
        help="CIFAR-10 .npz (.gpu-data/cifar10/cifar10_full_jpeg_q75.npz): also run the fast-recipe table (retrain, rl, salun; ~5 min)",
    )
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    paths = [str(ROOT)]
    if args.wheels:
        paths.insert(0, install_wheels(args.wheels))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    work = Path(tempfile.mkdtemp(prefix="erasure-gpu-check-"))
    py, erasure = sys.executable, [sys.executable, "-m", "erasure"]
    tiny = work / "tiny-sd"
    sd_overrides = [
        "generation.images_per_set=8",
        "generation.steps=4",
        "generation.batch_size=4",
        "mask.batches=2",
        "mask.batch_size=4",
        "train.steps=20",
        "train.batch_size=4",
        "train.lr=1e-4",
    ]
    # 100 of the config's 250 ESD steps: enough to show a bf16 erase and its graphed trajectory run on CUDA.
    erase_esd = [*erasure, "erase", "--method", "esd", "--workdir", str(work / "demo"), "mixed_precision=bf16", "unlearn.steps=100"]
    # fmt: off
    parts: dict[str, list[list[str]]] = {
        # The tests marked slow exercise CPU multi-process jobs, notebooks and long CLI runs, which CI covers;
        # left out by default to keep the check within its 8 minutes. No -x: one GPU run should show every failure.
        "tests": [pytest_command(py, args.all_tests)],
        "demo": [[*erasure, "demo", "--workdir", str(work / "demo")]],
        "ddpm-bf16": [
            [*erase_esd, "unlearn.esd_cuda_graph=false"],
            [*erase_esd, "unlearn.forget_class=1", "unlearn.esd_cuda_graph=true"],
        ],
        "sd-tiny": [
            [*erasure, "sd", "tiny-pipeline", str(tiny)],
            [*erasure, "sd", "erase", "-c", "configs/sd/nudity_salun.yaml", "--model", str(tiny), "--workdir", str(work / "sd")]
            + sd_overrides,
            # FMN with its textual-inversion stage, and ESD-x on bf16 weights (esd_sd.py's), on the same images.
            [*erasure, "sd", "erase", "-c", "configs/sd/nudity_salun.yaml", "--model", str(tiny), "--workdir", str(work / "sd"),
             "--method", "fmn", "fmn.ti_steps=20"] + sd_overrides,
            [*erasure, "sd", "erase", "-c", "configs/sd/nudity_salun.yaml", "--model", str(tiny), "--workdir", str(work / "sd-bf16"),
             "--method", "esd-x", "train.weights_dtype=bf16"] + sd_overrides,
            [*erasure, "audit", "nudity", "--model", f"base={tiny}", "--model", f"salun={work / 'sd' / 'salun' / 'model'}",
             "--prompts", "prompts/template_forget.txt", "--limit", "4", "--steps", "4", "--out", str(work / "audit")],
            [*erasure, "audit", "attack", "--base", str(tiny), "--model", f"salun={work / 'sd' / 'salun' / 'model'}",
             "--prompts", "prompts/template_forget.txt", "--limit", "2", "--iterations", "2", "--timesteps", "2", "--steps", "4",
             "--target-steps", "4", "--size", "32", "--k", "2", "--out", str(work / "attack")],
            [*erasure, "sd", "tiny-pipeline", str(work / "tiny-xl"), "--xl"],
            [*erasure, "sd", "erase", "-c", "configs/sd/nudity_salun_sdxl.yaml", "--model", str(work / "tiny-xl"),
             "--workdir", str(work / "sdxl"), "--method", "salun", "--method", "esd-x"] + sd_overrides,
        ],
        "classification": [[*erasure, "unlearn-classifier", "--workdir", str(work / "classification")]],
    }
    if args.tokenizer:
        compile_flags = ["--compile", "off", "on"] if args.compile else ["--compile", "off"]
        def sd_step(label: str, precisions: list[str], compiled: str) -> list[str]:
            return [
                py, "benchmarks/sd_training.py", "--tokenizer", str(args.tokenizer), "--label", label, "--phases", "salun",
                "--batch-sizes", "8", "--precisions", *precisions, "--checkpointing", "off", "--compile", compiled,
                "--warmup-steps", "2", "--measure-steps", "5",
            ]
        # Compiled in bf16 only, as a run of its own: fp32 compiled would cost another ~2 min of compiling.
        parts["sd-step"] = [sd_step("gpu-check", ["no", "bf16"], "off")]
        parts["sd-step"] += [sd_step("gpu-check-compiled", ["bf16"], "on")] if args.compile else []
        # ESD at the reference's batch 1; its step includes the sampled DDIM trajectory (25 of 50 steps on average).
        parts["esd-step"] = [[
            py, "benchmarks/sd_training.py", "--tokenizer", str(args.tokenizer), "--label", "gpu-check-esd", "--phases", "esd-x",
            "--batch-sizes", "1", "--precisions", "no", "bf16", "--checkpointing", "off", *compile_flags,
            "--esd-cuda-graph", "off", "on", "--warmup-steps", "1", "--measure-steps", "5", "--no-flops",
        ]]
        generation = [
            py, "benchmarks/generation_throughput.py", "--tokenizer", str(args.tokenizer), "--label", "gpu-check",
            "--images", "16", "--batch-size", "8", "--steps", "50", "--nudenet-images", "16",
        ]
        batch32 = [*generation[:5], "gpu-check-b32", "--images", "32", "--batch-size", "32", *generation[10:]]
        # The audits' own defaults (bf16, LMS, noise drawn on the CPU), at 50 steps to compare with the runs above.
        audit = [*batch32[:5], "gpu-check-audit", *batch32[6:], "--dtype", "bf16", "--scheduler", "lms", "--generator", "cpu"]
        parts["generation"] = [generation, batch32, audit, *([[*generation, "--compile"]] if args.compile else [])]
    if args.cifar10:
        parts["cifar10-fast"] = [[
            py, "benchmarks/classification.py", "--config", "configs/classification/cifar10_random10_fast.yaml",
            "--data-path", str(args.cifar10), "--label", "gpu-check", "unlearn.methods=[retrain,rl,salun]",
            f"workdir={work / 'cifar10-fast'}",
        ]]
    limits = {
        "tests": 300, "demo": 120, "ddpm-bf16": 200, "sd-tiny": 240, "classification": 120,
        "sd-step": 360, "esd-step": 240, "generation": 420 if args.compile else 200, "cifar10-fast": 420,
    }
    # fmt: on

    summary: dict = {"benchmark": "gpu_check", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import torch

        summary["machine"] = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        }
    except ImportError:
        summary["machine"] = {"python": sys.version.split()[0]}
    summary["parts"] = {name: {"status": "skipped"} for name in PARTS if name in args.skip or name not in parts}
    started = time.time()
    deadline = started + args.budget if args.budget else None

    def run_part(name: str) -> dict:
        left = deadline - time.time() if deadline else None
        if left is not None and left < 20:
            return {"status": "skipped", "why": f"--budget {args.budget:g} s spent"}
        total, ok, tail = 0.0, True, ""
        for i, cmd in enumerate(parts[name]):
            limit = limits[name] if deadline is None else max(1, min(limits[name], int(deadline - time.time())))
            ok, seconds, tail = run(cmd, env, limit, work / f"{name}-{i}.log")
            total += seconds
            if not ok:
                break
        entry = {"status": "pass" if ok else "fail", "seconds": round(total, 1), "log": str(work / f"{name}-0.log")}
        if not ok:
            entry["tail"] = tail
            if name == "tests":  # the log stays on the machine: keep what each failure said
                entry["failures"] = test_failures((work / "tests-0.log").read_text())
        entry.update(figures(name, work, started))
        return entry

    def record(name: str, entry: dict) -> None:
        summary["parts"][name] = entry
        collect(name, args.out.parent, started)
        write_summary(args.out, summary)  # after every part: a run cut short keeps what it measured
        print(f"{name:15s} {entry['status']:5s} {entry.get('seconds', 0.0):7.1f} s", flush=True)

    todo = [name for name in PARTS if name not in summary["parts"]]
    # The tests run beside the other correctness parts, which only pass or fail (so the check
    # fits its 8 minutes); the timed benchmarks then run alone on the GPU.
    beside = [name for name in todo if name in SHARE_THE_GPU] if "tests" in todo else []
    with ThreadPoolExecutor(1) as pool:
        tests = pool.submit(run_part, "tests") if beside else None
        for name in beside:
            record(name, {**run_part(name), "shared_gpu_with": "tests"})
        if tests is not None:
            record("tests", tests.result())
    for name in todo:
        if name not in summary["parts"]:
            record(name, run_part(name))
    summary["parts"] = {name: summary["parts"][name] for name in PARTS}  # in run order
    write_summary(args.out, summary)
    print(f"wrote {args.out}")
    sys.exit(0 if all(p["status"] != "fail" for p in summary["parts"].values()) else 1)


def pytest_command(py: str, all_tests: bool) -> list[str]:
    """The suite on this machine: in parallel (pytest-xdist's ``-n``) where it is installed and there
    are the cores, each worker with its share of them; on one H100 the suite in one process
    outlasted the check's budget. Where pytest-timeout is installed, a test that hangs (a stuck
    process group, say) fails after 5 minutes instead of spending the whole part."""
    command = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", *([] if all_tests else ["-m", "not slow"])]
    if importlib.util.find_spec("pytest_timeout"):
        command += ["--timeout", "300"]
    cores = os.cpu_count() or 1
    workers = min(8, cores // 2)
    if workers < 2 or not importlib.util.find_spec("xdist"):
        return command
    return ["env", f"OMP_NUM_THREADS={cores // workers}", *command, "-n", str(workers)]


def write_summary(path: Path, summary: dict) -> None:
    """Write the summary atomically (a temporary file renamed over it): a kill mid-write leaves the last one whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def test_failures(log: str, chars: int = 1500) -> dict[str, str]:
    """Each failed test's id and the end of its short traceback, from pytest's ``-q --tb=short`` output."""
    sections: dict[str, str] = {}
    for block in log.split("\n____")[1:]:  # each failure's section opens with a '____ name ____' rule
        head, _, body = block.partition("\n")
        body = re.split(r"\n=====|\n-+ Captured", body)[0]  # the traceback, without captured output or the summary
        sections[head.strip("_ ")] = body[-chars:]
    failed = [line.split(" - ")[0].split(" ", 1)[1] for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return {test: next((text for name, text in sections.items() if test.replace("::", ".").endswith(name)), "") for test in failed}


# The result files each part writes into benchmarks/results, by its labels.
RESULT_FILES = {
    "sd-step": ["sd_training_gpu-check.json", "sd_training_gpu-check-compiled.json"],
    "esd-step": ["sd_training_gpu-check-esd.json"],
    "generation": [
        "generation_throughput_gpu-check.json",
        "generation_throughput_gpu-check-b32.json",
        "generation_throughput_gpu-check-compiled.json",
    ],
    "cifar10-fast": ["classification_cifar10_random10_fast_gpu-check.json", "classification_cifar10_random10_fast_gpu-check.md"],
}


def fresh(name: str, since: float) -> list[Path]:
    """Part ``name``'s result files in benchmarks/results written by this run (an older run's are not its figures)."""
    paths = [RESULTS / file for file in RESULT_FILES.get(name, [])]
    return [path for path in paths if path.is_file() and path.stat().st_mtime >= since]


def figures(name: str, work: Path, since: float) -> dict:
    """The headline numbers a part produced, read from its own result files."""
    try:
        if name == "demo":
            report = json.loads((work / "demo" / "eval" / "report.json").read_text())
            return {"report": report.get("models", report)}
        if name == "ddpm-bf16":  # the erase stages' own timings: eager, then the trajectory through CUDA graphs
            done = {k: work / "demo" / "erase" / f"esd-forget{c}" / "done.json" for k, c in (("eager", 0), ("cuda_graph", 1))}
            return {"esd_seconds": {k: json.loads(path.read_text())["seconds"] for k, path in done.items() if path.is_file()}}
        if name == "classification":
            return {"table": json.loads((work / "classification" / "results.json").read_text())["table"]}
        results = {path.name: json.loads(path.read_text()) for path in fresh(name, since) if path.suffix == ".json"}
        if name == "cifar10-fast":
            return {"table": r["table"], "total_seconds": r["total_seconds"]} if (r := next(iter(results.values()), None)) else {}
        if name in ("sd-step", "esd-step"):  # eager, then compiled
            rows = [row for file in RESULT_FILES[name] if file in results for row in results[file]["results"]]
            return {"rows": rows} if rows else {}
        if name == "generation":  # eager at batch 8, at batch 32, and compiled
            keys = dict(zip(RESULT_FILES["generation"], ("eager", "eager_batch32", "compiled")))
            return {keys[file]: r["measured"] for file, r in results.items()}
    except (OSError, KeyError, ValueError) as e:
        return {"figures_error": str(e)}
    return {}


def collect(name: str, folder: Path, since: float) -> None:
    """Copy the result files part ``name`` wrote beside the summary (the device returns only its output folder)."""
    if folder.resolve() == RESULTS.resolve():
        return
    folder.mkdir(parents=True, exist_ok=True)
    for path in fresh(name, since):
        shutil.copyfile(path, folder / path.name)


if __name__ == "__main__":
    main()
