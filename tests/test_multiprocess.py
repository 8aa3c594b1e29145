"""Two CPU processes (gloo) under `accelerate launch`: the multi-GPU code path without GPUs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erasure.cli import main
from erasure.core.saliency import Mask
from erasure.ddpm.model import load_unet
from erasure.sd.model import load_unet as load_sd_unet
from erasure.sd.tiny import tiny_pipeline
from tests.conftest import TINY
from tests.test_sd import TINY_SD

pytestmark = pytest.mark.slow  # launches two-process jobs (`make test-fast` skips them)

ACCELERATE = Path(sys.executable).with_name("accelerate")


needs_accelerate = pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="accelerate CLI not installed")


def launch_two_processes(*erasure_args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` two gloo CPU processes running ``python -m erasure ...``."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = str(ACCELERATE) if ACCELERATE.exists() else "accelerate"
    cmd = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "erasure",
        *erasure_args,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


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
    assert_mask_held(base, erased, Mask.load(folder / "mask.safetensors", base))


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
