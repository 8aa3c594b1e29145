import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tests that touch a device run on the GPU when there is one, so one `pytest` on a GPU
# machine covers the CUDA paths. accelerate fixes the device once per process, so every
# test uses this one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# A CPU-sized experiment: every stage of the DDPM path in seconds.
TINY = [
    "model.channels=[8,16]",
    "train.steps=40",
    "train.batch_size=32",
    "train.warmup_steps=5",
    "train.checkpoint_every=20",
    "classifier.channels=[8,16]",
    "classifier.steps=40",
    "unlearn.steps=6",
    "unlearn.batch_size=16",
    "unlearn.checkpoint_every=3",
    "unlearn.mask.batches=2",
    "unlearn.mask.batch_size=16",
    "sample.steps=4",
    "eval.samples_per_class=4",
    "eval.grid_samples=2",
    f"device={DEVICE}",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"workdir={tmp_path / 'run'}"]
