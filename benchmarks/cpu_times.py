"""How long `make demo`'s job and the test suites take on this machine: wall and CPU seconds.

    python benchmarks/cpu_times.py                 # demo, fast tests, all tests
    python benchmarks/cpu_times.py --only demo     # just the demo

Each job runs as a child process in a fresh temporary workdir (so nothing is reused), and
is timed by wall clock and by the CPU seconds (user + system) of the child and its own
children. Wall time depends on what else runs on the machine: the load average is recorded
before and after each job, and the CPU seconds are the number to compare across runs on a
busy machine. The demo's UA and retained accuracy are recorded too, since a faster demo
that no longer erases would be no gain.

Writes benchmarks/results/cpu_times.json (merging with jobs measured earlier).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402
from erasure.core.io import write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "cpu_times.json"


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> dict[str, float]:
    """Run ``cmd``; its wall seconds, CPU seconds (user, sys) and exit code. Output goes to ``log``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {
        "exit_code": code,
        "wall_seconds": round(wall, 1),
        "cpu_user_seconds": round(user, 1),
        "cpu_system_seconds": round(system, 1),
        "cpu_seconds": round(user + system, 1),
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["demo", "test-fast", "test"], action="append", help="jobs to time (default: all)")
    args = parser.parse_args()
    jobs = args.only or ["demo", "test-fast", "test"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    results = json.loads(OUT.read_text()).get("jobs", {}) if OUT.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for job in jobs:
            if job == "demo":
                cmd = [sys.executable, "-m", "erasure", "demo", "--workdir", str(tmp / "demo")]
            else:
                cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-m", "not slow"] if job == "test-fast" else [])]
            print(f"{job}: {' '.join(cmd)}", flush=True)
            r = timed(cmd, ROOT, env, tmp / f"{job}.log")
            r["command"] = "erasure demo" if job == "demo" else f"make {job} (its pytest part)"
            r["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            if job == "demo" and r["exit_code"] == 0:
                report = json.loads((tmp / "demo" / "eval" / "report.json").read_text())
                erased = report["models"][next(m for m in report["models"] if m != "original")]
                r["ua"] = round(erased["ua"], 4)
                r["retained_accuracy"] = round(erased["retained_accuracy"], 4)
                # the whole table the README's demo transcript shows (tests/test_readme_numbers.py checks it)
                r["fid_features"] = report["fid_features"]
                r["models"] = {
                    name: {k: round(scores[k], 4) for k in ("ua", "retained_accuracy", "fid_retained")}
                    for name, scores in report["models"].items()
                }
                done = [line for line in (tmp / "demo.log").read_text().splitlines() if line.startswith("done in ")]
                r["printed_seconds"] = float(done[-1].split()[2]) if done else None  # the demo's own "done in N s"
                r["stage_seconds"] = {
                    stage: json.loads((tmp / "demo" / stage / "done.json").read_text())["seconds"]
                    for stage in ("ddpm", "classifier", "erase/salun-forget0")
                }
            if job != "demo":
                tail = (tmp / f"{job}.log").read_text().strip().splitlines()
                r["summary"] = tail[-1] if tail else ""
            results[job] = r
            print(f"  {json.dumps(r)}", flush=True)
    record = {"machine": machine(), "jobs": results}  # each job has its date; jobs kept from an earlier run keep theirs
    write_json(OUT, record)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
