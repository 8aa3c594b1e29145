import os
from contextlib import contextmanager

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tests that touch a device run on the GPU when there is one, so one `pytest` on a GPU
# machine covers the CUDA paths. accelerate fixes the device once per process, so every
# test uses this one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    # The tests check semantics at fp32 precision and compare runs bit for bit (a resumed run
    # with a straight one, a run of k epochs with the first k of a longer one). On CUDA that
    # needs deterministic kernels (cuDNN's weight gradients add in any order otherwise) and no
    # TF32 convolutions, which PyTorch allows by default and erasure's runs keep for speed.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


@contextmanager
def no_host_sync():
    """On CUDA, any host synchronisation inside the block raises (sync debug mode): a training step
    that waits for the GPU leaves it idle while Python launches the next step. On a CPU, nothing."""
    if DEVICE != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


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


def save_tiny_models(root, names: tuple[str, ...]):
    """Tiny random SD pipeline folders ``root/name``, the k-th seeded k (so they differ); returns ``root``."""
    from erasure.sd.tiny import tiny_pipeline

    for seed, name in enumerate(names):
        tiny_pipeline(root / f"tok-{name}", seed=seed).save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline folder, built once per test session (tests only read it)."""
    from erasure.sd.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_pipeline(folder / "tokenizer").save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture
def one_thread():
    """One CPU thread: tiny networks run fastest so, and runs compared bit for bit must share a thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
