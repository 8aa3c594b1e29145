"""Kills, full disks, concurrent jobs and stale partial outputs."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from erasure.core.errors import ErasureError
from erasure.core.io import load_checkpoint, save_checkpoint, save_tensors, write_json
from tests.conftest import DEVICE

BASE = [
    "model.channels=[8,16]",
    "train.steps=12",
    "train.batch_size=16",
    "train.warmup_steps=3",
    "train.checkpoint_every=5",
    f"device={DEVICE}",
]


def test_killed_base_training_resumes_bit_identical(tmp_path, monkeypatch):
    from erasure.ddpm import pipeline
    from erasure.ddpm.config import load

    straight = pipeline.train_base(load(None, [*BASE, f"workdir={tmp_path / 'a'}"]))

    real, calls = pipeline.denoising_loss, []

    def dies_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # after the checkpoint at step 5: what a SIGKILL leaves on disk
            raise SystemExit("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "denoising_loss", dies_at_step_7)
    with pytest.raises(SystemExit):
        pipeline.train_base(load(None, [*BASE, f"workdir={tmp_path / 'b'}"]))
    assert json.loads((tmp_path / "b" / "ddpm" / "checkpoint" / "state.json").read_text())["step"] == 5
    assert not (tmp_path / "b" / "ddpm" / "done.json").exists()
    monkeypatch.setattr(pipeline, "denoising_loss", real)
    resumed = pipeline.train_base(load(None, [*BASE, f"workdir={tmp_path / 'b'}"]))

    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name


def test_checkpoints_round_trip_the_optimizer_and_are_byte_reproducible(tmp_path):
    model = torch.nn.Linear(3, 2)
    for opt in (torch.optim.AdamW(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)):
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        state = opt.state_dict()
        for folder in ("a", "b"):
            save_checkpoint(tmp_path / folder, 3, {"model": model.state_dict()}, {"optimizer": state, "fingerprint": "x"})
        back = load_checkpoint(tmp_path / "a")
        assert back["step"] == 3 and back["fingerprint"] == "x"
        fresh = type(opt)(model.parameters(), lr=0.5)
        fresh.load_state_dict(back["optimizer"])
        assert fresh.state_dict()["param_groups"] == state["param_groups"]
        for i, entry in state["state"].items():
            for key, value in entry.items():
                assert torch.equal(torch.as_tensor(fresh.state_dict()["state"][i][key]), torch.as_tensor(value))
        for file in sorted((tmp_path / "a").iterdir()):
            assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes(), file.name


# ----------------------------------------------------------------------------- full disks


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("write", ["tensors", "json", "checkpoint"])
def test_a_full_disk_is_one_clear_error_and_leaves_no_temporary_files(tmp_path, monkeypatch, write):
    import erasure.core.io as io

    monkeypatch.setattr(io, "_write_safetensors", _full_disk)
    monkeypatch.setattr(type(tmp_path), "write_text", _full_disk)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ErasureError) as info:
        if write == "tensors":
            save_tensors(target / "mask.safetensors", {"a": torch.zeros(10)})
        elif write == "json":
            write_json(target / "done.json", {"x": 1})
        else:
            save_checkpoint(target / "checkpoint", 1, {"model": {"a": torch.zeros(10)}}, {})
    message = str(info.value)
    assert "No space left on device" in message and "free there" in message and str(target) in message
    assert list(target.iterdir()) == []  # the temporary file (or half-built checkpoint) is gone


def test_a_file_size_limit_mid_write_is_a_clear_error(tmp_path):
    # A real short write: the process may not grow a file past 64 KiB (ulimit -f), so the write fails with EFBIG.
    code = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from erasure.core.errors import ErasureError
        from erasure.core.io import save_checkpoint, save_tensors
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        big = {{"w": torch.zeros(100_000)}}
        for save in (lambda: save_tensors({str(tmp_path / "m.safetensors")!r}, big),
                     lambda: save_checkpoint({str(tmp_path / "checkpoint")!r}, 1, {{"model": big}}, {{}})):
            try:
                save()
            except ErasureError as e:
                print("ERR", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("ERR")]
    assert len(lines) == 2 and all("File too large" in line and "needed" in line for line in lines), out
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_to_the_cli_boundary_and_leave_no_temporary_files(tmp_path, monkeypatch):
    # Not a full disk: the OSError keeps its type (the command line turns it into one line, --debug shows it).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError):
        write_json(blocker / "sub" / "done.json", {})
    monkeypatch.setattr(type(tmp_path), "write_text", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        write_json(tmp_path / "out" / "done.json", {})
    assert list((tmp_path / "out").iterdir()) == []


# ----------------------------------------------------------------------------- concurrent jobs


def _config():
    from erasure.ddpm.config import Config

    return Config()


CFG = _config()

HOLD = textwrap.dedent(
    """
    import sys, time
    from erasure.core.stages import Stage
    from erasure.ddpm.config import Config
    stage = Stage(sys.argv[1], "fp")
    stage.begin(Config())
    print("holding", flush=True)
    time.sleep(60)
    """
)


def _holder(folder):
    """A second process that has begun a stage in ``folder`` and sits in it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_job_in_a_busy_folder_refuses_at_once_naming_the_holder(tmp_path):
    import socket

    from erasure.core.stages import Stage

    proc = _holder(tmp_path / "stage")
    try:
        ran = []
        with pytest.raises(ErasureError, match=rf"in use by another job \(PID {proc.pid} on host {socket.gethostname()}"):
            Stage(tmp_path / "stage", "fp").run(CFG, lambda: ran.append(1) or {})
        assert ran == [] and not (tmp_path / "stage" / "done.json").exists()
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_job_is_taken_over(tmp_path, capsys):
    from erasure.core.stages import Stage

    proc = _holder(tmp_path / "stage")
    proc.kill()  # SIGKILL: no cleanup ran, the lock file still names the dead job
    proc.wait()
    assert str(proc.pid) in (tmp_path / "stage" / ".lock").read_text()
    assert Stage(tmp_path / "stage", "fp").run(CFG, lambda: {"ok": 1})
    assert "taking over" in capsys.readouterr().err
    assert json.loads((tmp_path / "stage" / "done.json").read_text())["ok"] == 1
    assert (tmp_path / "stage" / ".lock").read_text() == ""  # released


def test_only_the_main_rank_locks(tmp_path, monkeypatch):
    from erasure.core.stages import Stage

    proc = _holder(tmp_path / "stage")  # plays rank 0 of the same job
    try:
        monkeypatch.setenv("RANK", "1")
        stage = Stage(tmp_path / "stage", "fp")
        stage.begin(CFG)  # does not refuse: rank 0 holds the lock for the whole job
        assert not stage.lock.held
    finally:
        proc.kill()
        proc.wait()


def test_in_process_a_failed_run_releases_its_lock(tmp_path):
    from erasure.core.stages import Stage

    def fails():
        raise ErasureError("boom")

    with pytest.raises(ErasureError, match="boom"):
        Stage(tmp_path, "fp").run(CFG, fails)
    assert Stage(tmp_path, "fp").run(CFG, lambda: {})


# ----------------------------------------------------------------------------- stale partial outputs


def test_an_unfinished_run_with_other_settings_is_refused(tmp_path):
    from erasure.core.stages import Stage

    def interrupted():
        (tmp_path / "partial.png").write_text("made with the old settings")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stage(tmp_path, "old").run(CFG, interrupted)
    with pytest.raises(ErasureError, match="unfinished run with other settings.*fingerprint old, now new"):
        Stage(tmp_path, "new").run(CFG, lambda: {})
    assert Stage(tmp_path, "old").run(CFG, lambda: {})  # the old settings finish it


def test_interrupted_sd_generate_data_rerun_with_other_settings_reuses_nothing(tmp_path):
    from erasure.sd.tiny import tiny_pipeline

    tiny_pipeline(tmp_path / "tokenizer").save_pretrained(tmp_path / "model")
    common = [f"model.pretrained={tmp_path / 'model'}", f"workdir={tmp_path / 'run'}", f"device={DEVICE}", "generation.batch_size=2"]
    old = ["generation.steps=3", "generation.images_per_set=4"]

    import erasure.sd.generate as gen

    real = gen._save_png
    saved = []

    def dies_after_two(image, path):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(path)
        real(image, path)

    gen._save_png = dies_after_two
    try:
        from erasure.cli import main

        assert main(["sd", "generate-data", "-c", "configs/sd/nudity_salun.yaml", "--set", "forget", *common, *old]) == 130
    finally:
        gen._save_png = real
    images = tmp_path / "run" / "data" / "forget" / "images"
    assert len(list(images.glob("*.png"))) == 2 and not (images.parent / "done.json").exists()

    new = ["generation.steps=2", "generation.images_per_set=4"]
    assert main(["sd", "generate-data", "-c", "configs/sd/nudity_salun.yaml", "--set", "forget", *common, *new]) == 2
    # The old settings finish the set, reusing their own two images.
    assert main(["sd", "generate-data", "-c", "configs/sd/nudity_salun.yaml", "--set", "forget", *common, *old]) == 0
    assert json.loads((images.parent / "done.json").read_text())["images"] == 4


def test_a_run_that_failed_before_making_anything_does_not_block_other_settings(tmp_path):
    from erasure.core.stages import Stage

    def fails_at_once():
        raise ErasureError("wrong model path")

    with pytest.raises(ErasureError, match="wrong model path"):
        Stage(tmp_path, "old").run(CFG, fails_at_once)
    assert Stage(tmp_path, "new").run(CFG, lambda: {})


def load_gpu_check():
    """benchmarks/gpu_check.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_keeps_what_it_measured_within_its_budget(tmp_path):
    """benchmarks/gpu_check.py on scarce GPU time: its summary lands in $OUT, parts left no time are skipped
    (not killed with the run), and only result files written by this run are copied beside the summary."""
    import time

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    command = [sys.executable, "benchmarks/gpu_check.py", "--budget", "1", "--skip", "tests"]
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert parts["tests"] == {"status": "skipped"}
    assert parts["demo"] == {"status": "skipped", "why": "--budget 1 s spent"}
    assert not list(out.glob(".*.tmp"))

    gpu_check = load_gpu_check()
    gpu_check.RESULTS = results = tmp_path / "results"
    results.mkdir()
    (results / "sd_training_gpu-check.json").write_text('{"results": [{"seconds_per_step": 1.0}]}')
    os.utime(results / "sd_training_gpu-check.json", (0, 0))  # from an earlier run
    since = time.time()
    (results / "sd_training_gpu-check-esd.json").write_text('{"results": [{"seconds_per_step": 2.0}]}')
    assert gpu_check.figures("sd-step", tmp_path, since) == {}
    assert gpu_check.figures("esd-step", tmp_path, since) == {"rows": [{"seconds_per_step": 2.0}]}
    gpu_check.collect("sd-step", out, since)
    gpu_check.collect("esd-step", out, since)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "sd_training_gpu-check-esd.json"]


def test_gpu_check_runs_the_tests_beside_the_correctness_parts_and_times_the_rest_alone(tmp_path, monkeypatch):
    """The check fits its 8 minutes by running the tests while the demo, ESD, tiny-SD and classification parts
    (pass or fail only) share the GPU; the summary says which parts shared it."""
    import time

    gpu_check = load_gpu_check()
    spans: dict[str, tuple[float, float]] = {}

    def fake_run(cmd, env, timeout, log):  # each part's commands, timed instead of run
        start = time.time()
        time.sleep(1.5 if log.name.startswith("tests") else 0.05)  # the tests outlast the dozen commands that share the GPU
        spans.setdefault(log.name.rsplit("-", 1)[0], (start, time.time()))
        return True, 0.1, ""

    monkeypatch.setattr(gpu_check, "run", fake_run)
    out = tmp_path / "summary.json"
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--out", str(out), "--tokenizer", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_code:
        gpu_check.main()
    assert exit_code.value.code == 0
    parts = json.loads(out.read_text())["parts"]
    tests_start, tests_end = spans["tests"]
    for name in gpu_check.SHARE_THE_GPU:
        assert spans[name][0] < tests_end and parts[name]["shared_gpu_with"] == "tests", name
    for name in ("sd-step", "esd-step", "generation"):
        assert spans[name][0] >= tests_end and "shared_gpu_with" not in parts[name], name
    assert "shared_gpu_with" not in parts["tests"]


def test_gpu_check_keeps_what_each_failed_test_said(tmp_path):
    """On a GPU machine the tests' log stays behind; the summary keeps each failure's traceback."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad():\n    print('noise')\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.parametrize('v', [0.5])\ndef test_param(v):\n    raise ValueError(f'boom {v}')\n"
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "test_sample.py"]
    log = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True).stdout
    gpu_check = load_gpu_check()
    failures = gpu_check.test_failures(log)
    assert list(failures) == ["test_sample.py::test_bad", "test_sample.py::test_param[0.5]"]
    assert "one is not two" in failures["test_sample.py::test_bad"] and "noise" not in failures["test_sample.py::test_bad"]
    assert "ValueError: boom 0.5" in failures["test_sample.py::test_param[0.5]"]


def test_gpu_check_interrupts_a_part_at_its_limit_and_keeps_the_failures_so_far(tmp_path, monkeypatch):
    """A part that runs out of time gets SIGINT before it is killed: pytest still prints the failures it met
    (on one H100 the tests part once stopped at its limit with nothing but progress dots to show)."""
    (tmp_path / "test_sample.py").write_text(
        "import time\ndef test_bad():\n    assert 1 == 2, 'one is not two'\ndef test_slow():\n    time.sleep(120)\n"
    )
    gpu_check = load_gpu_check()
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # the folder the command runs in
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "test_sample.py"]
    ok, seconds, tail = gpu_check.run(command, dict(os.environ), 10, tmp_path / "tests-0.log")
    log = (tmp_path / "tests-0.log").read_text()
    assert not ok and seconds < 10 and tail.endswith("timed out after 10 s")
    assert "KeyboardInterrupt" in log and "one is not two" in gpu_check.test_failures(log)["test_sample.py::test_bad"]


def test_gpu_check_runs_the_suite_in_parallel_where_it_can(monkeypatch):
    """pytest-xdist workers, each with its share of the cores, on a machine with them; one process otherwise."""
    import importlib.util

    gpu_check = load_gpu_check()
    find_spec = importlib.util.find_spec
    installed = {"xdist", "pytest_timeout"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else find_spec(name, *a))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    command = gpu_check.pytest_command("python", all_tests=False)
    assert command[:2] == ["env", "OMP_NUM_THREADS=2"] and command[-2:] == ["-n", "8"] and "not slow" in command
    assert command[command.index("--timeout") + 1] == "300"  # a hung test fails alone
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    installed.clear()
    assert gpu_check.pytest_command("python", all_tests=True)[:3] == ["python", "-m", "pytest"]
    assert "-n" not in gpu_check.pytest_command("python", all_tests=True)
    assert "--timeout" not in gpu_check.pytest_command("python", all_tests=True)


def test_gpu_check_compiles_the_sd_step_in_bf16_only_and_reports_both_runs(tmp_path, monkeypatch):
    """--compile adds a bf16 compiled SD step as a run of its own (an fp32 compile would cost ~2 more minutes)."""
    import time

    gpu_check = load_gpu_check()
    commands: dict[str, list[list[str]]] = {}

    def fake_run(cmd, env, timeout, log):  # records each part's commands instead of running them
        commands.setdefault(log.name.rsplit("-", 1)[0], []).append(cmd)
        return True, 0.1, ""

    monkeypatch.setattr(gpu_check, "run", fake_run)
    skip = ["tests", "demo", "ddpm-bf16", "sd-tiny", "classification", "esd-step", "generation"]
    argv = ["gpu_check.py", "--out", str(tmp_path / "s.json"), "--tokenizer", str(tmp_path), "--compile", "--skip", *skip]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        gpu_check.main()
    eager, compiled = commands["sd-step"]

    def after(cmd: list[str], flag: str) -> list[str]:
        return cmd[cmd.index(flag) + 1 : cmd.index(flag) + 3]

    assert after(eager, "--precisions") == ["no", "bf16"] and after(eager, "--compile")[0] == "off"
    assert after(compiled, "--precisions")[0] == "bf16" and after(compiled, "--precisions")[1].startswith("--")
    assert after(compiled, "--compile")[0] == "on" and after(compiled, "--label")[0] == "gpu-check-compiled"

    gpu_check.RESULTS = results = tmp_path / "results"
    results.mkdir()
    since = time.time()
    (results / "sd_training_gpu-check.json").write_text('{"results": [{"compiled": false}]}')
    (results / "sd_training_gpu-check-compiled.json").write_text('{"results": [{"compiled": true}]}')
    assert gpu_check.figures("sd-step", tmp_path, since) == {"rows": [{"compiled": False}, {"compiled": True}]}
