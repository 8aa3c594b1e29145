"""Two CPU processes (gloo) under `accelerate launch`: the multi-GPU code path without GPUs."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erasure.classification.model import resnet18
from erasure.cli import main
from erasure.core.io import load_tensors
from erasure.core.saliency import Mask
from erasure.ddpm.model import load_unet
from erasure.ddpm.pipeline import RAW_WEIGHTS
from erasure.sd.model import load_unet as load_sd_unet
from erasure.sd.tiny import tiny_pipeline
from tests.conftest import TINY, save_tiny_models
from tests.test_sd import TINY_SD

pytestmark = pytest.mark.slow  # launches two-process jobs (`make test-fast` skips them)

ACCELERATE = Path(sys.executable).with_name("accelerate")


needs_accelerate = pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="accelerate CLI not installed")


# CPU processes, on a GPU machine too: accelerate's own flag, which `accelerate launch --multi_gpu` passes on.
CPU_ENV = {"ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def two_process_command(*erasure_args: str) -> list[str]:
    """``accelerate launch`` of two processes running ``python -m erasure ...`` (run it with :data:`CPU_ENV`)."""
    launcher = str(ACCELERATE) if ACCELERATE.exists() else "accelerate"
    flags = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [launcher, "launch", *flags, "-m", "erasure", *erasure_args]


def launch_two_processes(*erasure_args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Two gloo CPU processes running ``python -m erasure ...``, to the end."""
    result = subprocess.run(
        two_process_command(*erasure_args), env={**os.environ, **CPU_ENV}, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_one_process(*erasure_args: str) -> None:
    """``python -m erasure ...`` as one process with the same CPU settings (on a GPU machine too: CPU, fp32)."""
    result = subprocess.run([sys.executable, "-m", "erasure", *erasure_args], env={**os.environ, **CPU_ENV}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_mask_held(base: torch.nn.Module, erased: torch.nn.Module, mask: Mask) -> None:
    changed = 0
    for (n, b), e in zip(base.named_parameters(), erased.parameters()):
        assert torch.equal(b[~mask.tensors[n]], e[~mask.tensors[n]]), n
        changed += int((b != e).sum())
    assert changed > 0


@needs_accelerate
def test_two_process_erase_keeps_the_mask(tmp_path):
    args = [*TINY, f"workdir={tmp_path / 'run'}"]
    assert main(["train-ddpm", *args]) == 0
    result = launch_two_processes("erase", *args)
    assert result.stdout.count("salun: ") == 1, result.stdout  # results are printed once, by the main process
    folder = tmp_path / "run" / "erase" / "salun-forget0"
    base, erased = load_unet(tmp_path / "run" / "ddpm" / "model"), load_unet(folder / "model")
    base.load_state_dict(load_tensors(tmp_path / "run" / "ddpm" / RAW_WEIGHTS))  # the weights erasure starts from
    assert_mask_held(base, erased, Mask.load(folder / "mask.safetensors", base))


@needs_accelerate
def test_two_process_evaluate_shares_the_sampling_and_matches_one_process(tmp_path):
    """``erasure evaluate`` under launch: each process samples every other batch (before, each sampled
    every image, all on the first GPU); the main process joins them, and the samples and the report
    are one process's, bit for bit."""
    args = [*TINY, f"workdir={tmp_path / 'run'}", "eval.samples_per_class=6", "eval.batch_size=16", "sample.eta=1.0"]
    for command in ("train-ddpm", "train-classifier", "erase"):
        assert main([command, *args]) == 0
    two = launch_two_processes("evaluate", *args)
    assert two.stdout.count("salun: UA") == 1, two.stdout  # scored and printed once, by the main process
    # 60 images are 4 batches of 16; the main process's bar counts its 2 (the bar shows only there)
    assert re.search(r"sampling salun: +0%.* 0/2 ", two.stderr) and "/4 " not in two.stderr, two.stderr[-2000:]
    samples = tmp_path / "run" / "eval" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["original.safetensors", "salun.safetensors"]  # the parts are gone
    two_samples = {name: load_tensors(samples / f"{name}.safetensors")["images"] for name in ("original", "salun")}
    two_report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    shutil.rmtree(tmp_path / "run" / "eval")
    run_one_process("evaluate", *args)
    for name, images in two_samples.items():
        assert torch.equal(images, load_tensors(samples / f"{name}.safetensors")["images"]), name
    assert json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["models"] == two_report["models"]


@needs_accelerate
def test_two_process_stable_diffusion_salun(tmp_path):
    tiny_pipeline(tmp_path / "tokenizer").save_pretrained(tmp_path / "tiny")
    workdir = tmp_path / "run"
    config = ["-c", "configs/sd/nudity_salun.yaml", *TINY_SD, f"model.pretrained={tmp_path / 'tiny'}", f"workdir={workdir}"]
    launch_two_processes("sd", "erase", *config)
    # Both processes generated their share of each training set; the main process wrote the manifest.
    assert len(list((workdir / "data" / "forget" / "images").glob("*.png"))) == 6
    base, erased = load_sd_unet(str(tmp_path / "tiny")), load_sd_unet(str(workdir / "salun" / "model"))
    assert_mask_held(base, erased, Mask.load(workdir / "salun" / "mask.safetensors", base))


@needs_accelerate
def test_two_process_fmn_trains_what_its_loss_reaches(tmp_path):
    """FMN's loss reads attention probabilities, so the last cross-attention's to_v/to_out and the
    layers after it get no gradient. One process leaves them alone; under DDP they made the second
    step fail ("Expected to have finished reduction in the prior iteration"), until FMN asked DDP
    for a static graph. Two processes now train the weights the loss reaches and no others."""
    tiny_pipeline(tmp_path / "tokenizer").save_pretrained(tmp_path / "tiny")
    workdir = tmp_path / "run"
    config = ["-c", "configs/sd/nudity_fmn.yaml", *TINY_SD, f"model.pretrained={tmp_path / 'tiny'}", f"workdir={workdir}"]
    launch_two_processes("sd", "erase", *config)
    run_one_process("sd", "erase", *config[:-1], f"workdir={tmp_path / 'one'}")
    base = load_sd_unet(str(tmp_path / "tiny")).state_dict()

    def changed(run: Path) -> set[str]:
        erased = load_sd_unet(str(run / "fmn" / "model")).state_dict()
        return {k for k in base if not torch.equal(base[k], erased[k])}

    assert changed(workdir) == changed(tmp_path / "one")  # the same weights move, whatever the number of processes
    assert any(".attn2.to_k." in k for k in changed(workdir))  # the keys make the attention probabilities
    assert not any(k.startswith(("conv_norm_out.", "conv_out.")) for k in changed(workdir))  # nothing reaches these


def _read_log(path: Path) -> list[tuple[int, float]]:
    rows = path.read_text().splitlines()[1:]
    return [(int(r.split(",")[0]), float(r.split(",")[1])) for r in rows]


@needs_accelerate
def test_two_process_classification_matches_one_process(tmp_path, one_thread):
    """``erasure unlearn-classifier`` on two gloo processes trains what one process trains.

    The two-process job trains the original model, Retrain, RL and SalUn; a one-process run
    then reuses that original model (and split) and trains the same methods. Each step's
    global batch (indices, crops, flips, random labels) is the one-process batch, split
    between the processes (unevenly where it is odd), and BatchNorm normalizes with the
    global batch's statistics, so the recipe is the same. "The same" here means: the same
    optimizer steps (the logs list the same step numbers, with the whole batch's loss), the
    same SalUn mask bit for bit (made by one process from the same model), and every weight
    and BatchNorm statistic within 1e-3 of the one-process run's.

    Not bit for bit: the gradient all-reduce and the global BatchNorm sums add two shards'
    partial sums, which rounds differently from one batch's sum. Training amplifies such
    rounding: one process with 1 thread and with 2 threads ends 2 epochs of this Retrain
    ~1e-3 apart, so the test keeps to 1 epoch, where the two-process differences seen are
    ~1e-6. With per-process BatchNorm statistics (``sync_batchnorm=false``) they differ by
    ~0.1 (weights and statistics), so the tolerance does catch a changed recipe.
    """
    config = [
        "device=cpu",
        "model.width=4",
        "train.epochs=2",
        "retrain.epochs=1",
        "retrain.batch_size=127",  # 270 retain images: 127, 127, 16 (shards of 64 and 63, 8 and 8)
        "unlearn.rl.epochs=1",
        "unlearn.salun.epochs=1",
        "unlearn.batch_size=63",  # forget pass: one batch of 30; retain pass: 4 x 63 + 18 (shards of 32 and 31, 9 and 9)
        "unlearn.augment=true",
        "unlearn.methods=[retrain,rl,salun]",
        "split.train_limit=300",
        "split.test_limit=100",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    result = launch_two_processes("unlearn-classifier", *config, f"workdir={two}")
    assert result.stdout.count("| salun |") == 1 and result.stdout.count("[salun] unlearning") == 1, result.stdout
    assert (two / "results.md").is_file() and not list(two.rglob("checkpoint"))

    one.mkdir()
    shutil.copy(two / "split.safetensors", one)
    shutil.copytree(two / "original", one / "original")
    assert main(["unlearn-classifier", *config, f"workdir={one}"]) == 0

    original = resnet18(10, 1, width=4)
    original.load_state_dict(load_tensors(two / "original" / "model.safetensors"))
    for name in ("retrain", "rl", "salun"):
        a, b = load_tensors(one / name / "model.safetensors"), load_tensors(two / name / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=1e-3), (name, key)
        log_one, log_two = _read_log(one / name / "log.csv"), _read_log(two / name / "log.csv")
        assert [s for s, _ in log_one] == [s for s, _ in log_two] and log_two
        assert [loss for _, loss in log_two] == pytest.approx([loss for _, loss in log_one], rel=1e-4)  # the whole batch's loss

    mask_one = Mask.load(one / "salun" / "mask.safetensors", original)
    mask = Mask.load(two / "salun" / "mask.safetensors", original)
    assert all(torch.equal(mask.tensors[n], mask_one.tensors[n]) for n in mask.tensors)
    erased = resnet18(10, 1, width=4)
    erased.load_state_dict(load_tensors(two / "salun" / "model.safetensors"))
    assert_mask_held(original, erased, mask)


@needs_accelerate
@pytest.mark.slow
def test_a_failure_on_the_main_process_stops_every_process(tmp_path):
    """The main process alone writes the results; when that fails, the other process stops with a clear message.

    Before, the other process learnt of it only from its barrier: a gloo "Connection closed by
    peer" here, and with NCCL a wait until the launcher tears the job down.
    """
    workdir = tmp_path / "run"
    (workdir / "results.md").mkdir(parents=True)  # the main process's write of results.md fails: a folder is in the way
    config = ["device=cpu", "model.width=4", "train.epochs=1", "unlearn.methods=[ft]", "unlearn.ft.epochs=1"]
    config += ["split.train_limit=200", "split.test_limit=50", f"workdir={workdir}"]
    result = launch_two_processes("unlearn-classifier", *config, check=False, timeout=240)
    assert result.returncode != 0
    assert "results.md" in result.stderr and "the main process failed" in result.stderr, result.stderr[-3000:]


@needs_accelerate
def test_two_process_audits_split_the_prompts_and_match_one_process(tmp_path):
    """``erasure audit nudity`` and ``audit attack`` on two gloo processes: each process makes its share, the result is one process's.

    The evaluation commands build no Accelerator; before, on a machine without CUDA, each
    launched process believed itself alone and made every image (its progress bar counted
    all 3 prompts), writing the same files twice.
    """
    models = save_tiny_models(tmp_path / "models", ("a", "b"))
    prompts = tmp_path / "prompts.csv"
    rows = ['0,"a person on a beach",sexual,11,7,0', '1,"a statue",sexual,22,6,1', '2,"a bather",sexual,33,8,2']
    prompts.write_text("\n".join([",prompt,categories,evaluation_seed,evaluation_guidance,case_number", *rows]) + "\n")
    nudity = ["audit", "nudity", "--prompts", str(prompts), "--steps", "2", "--size", "16", "--batch-size", "1"]
    nudity += ["--model", f"a={models / 'a'}", "--model", f"b={models / 'b'}"]
    attack = ["audit", "attack", "--prompts", str(prompts), "--base", str(models / "a"), "--model", f"erased={models / 'b'}"]
    attack += ["--iterations", "2", "--timesteps", "2", "--steps", "2", "--target-steps", "2", "--size", "16", "--k", "2"]

    two = launch_two_processes(*nudity, "--out", str(tmp_path / "two"))
    assert two.stdout.count("| a |") == 1, two.stdout  # printed once, by the main process
    assert "2/2" in two.stderr and "3/3" not in two.stderr  # the main process made 2 of the 3 images of each model
    run_one_process(*nudity, "--out", str(tmp_path / "one"))
    for label in ("a", "b"):
        for i in range(3):
            name = f"images/{label}/{i:06d}.png"
            assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    result_two, result_one = (json.loads((tmp_path / run / "audit.json").read_text())["models"] for run in ("two", "one"))
    assert [result_two[m]["parts_total"] for m in "ab"] == [result_one[m]["parts_total"] for m in "ab"]

    two = launch_two_processes(*attack, "--out", str(tmp_path / "attack-two"))
    assert "targets: 100%" in two.stderr and "2/2" in two.stderr and "3/3" not in two.stderr
    run_one_process(*attack, "--out", str(tmp_path / "attack-one"))
    rows_two, rows_one = (
        json.loads((tmp_path / run / "attack.json").read_text())["models"]["erased"]["results"] for run in ("attack-two", "attack-one")
    )
    for a, b in zip(rows_two, rows_one, strict=True):
        assert a["adversarial_prompt"] == b["adversarial_prompt"] and a["post_detected"] == b["post_detected"]
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-6)  # same steps; the last bits of a float sum may differ


def _rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the launched process of ``rank`` whose command line contains ``marker``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if marker in cmdline and "-m erasure" in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@needs_accelerate
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the launched processes through /proc")
def test_two_process_training_stops_together_on_a_signal_and_resumes_exactly(tmp_path):
    """A SIGTERM to one process of a launched job (what a cluster sends before it kills a job) stops
    every process at the same step with a checkpoint; the rerun resumes there and ends with the
    weights of a job that was never interrupted, bit for bit."""
    import time

    config = ["device=cpu", "model.width=4", "train.epochs=12", "train.batch_size=32", "unlearn.methods=[]"]
    config += ["split.train_limit=320", "split.test_limit=40"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    launcher = subprocess.Popen(
        two_process_command("unlearn-classifier", *config, f"workdir={stopped}"),
        env={**os.environ, **CPU_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = stopped / "original" / "log.csv"
    deadline = time.monotonic() + 240
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and launcher.poll() is None:
        assert time.monotonic() < deadline, "the job logged no training steps"
        time.sleep(0.1)
    pid = _rank_pid(str(stopped), 1)
    assert pid is not None and launcher.poll() is None, "the job ended before it could be interrupted"
    os.kill(pid, signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode != 0 and "stopped after step" in stderr, stderr[-3000:]
    state = json.loads((stopped / "original" / "checkpoint" / "state.json").read_text())
    assert 0 < state["step"] < 120  # 12 epochs of 10 steps

    launch_two_processes("unlearn-classifier", *config, f"workdir={stopped}")  # resumes
    launch_two_processes("unlearn-classifier", *config, f"workdir={straight}")
    a, b = (load_tensors(run / "original" / "model.safetensors") for run in (stopped, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
