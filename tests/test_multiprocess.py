"""Two CPU processes (gloo) under `accelerate launch`: the multi-GPU code path without GPUs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erasure.cli import main
from erasure.ddpm import load_unet
from erasure.saliency import Mask
from tests.conftest import TINY

ACCELERATE = Path(sys.executable).with_name("accelerate")


@pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_process_erase_keeps_the_mask(tmp_path):
    args = [*TINY, f"workdir={tmp_path / 'run'}"]
    assert main(["train-ddpm", *args]) == 0
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
        "erase",
        *args,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "run" / "erase" / "salun-forget0"
    base, erased = load_unet(tmp_path / "run" / "ddpm" / "model"), load_unet(folder / "model")
    mask = Mask.load(folder / "mask.safetensors", base)
    changed = 0
    for (n, b), e in zip(base.named_parameters(), erased.parameters()):
        assert torch.equal(b[~mask.tensors[n]], e[~mask.tensors[n]]), n
        changed += int((b != e).sum())
    assert changed > 0
