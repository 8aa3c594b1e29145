import io

import numpy as np
import pytest
import torch
from PIL import Image

from erasure.core.config import DataConfig
from erasure.core.data import load_data, to_model_range, to_uint8
from erasure.core.errors import ErasureError


def test_embedded_digits_split():
    train, test = load_data(DataConfig(name="digits"), "train"), load_data(DataConfig(name="digits"), "test")
    assert train.images.dtype == torch.uint8 and train.shape == (1, 8, 8)
    assert len(train.labels) + len(test.labels) == 1797
    assert set(train.labels.tolist()) == set(range(10))
    assert int(train.images.max()) == 255


def test_mnist_npz_is_padded_to_32(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=np.arange(20) % 10,
        x_test=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        y_test=np.arange(5),
    )
    data = load_data(DataConfig(name="mnist", path=str(path)), "train")
    assert data.shape == (1, 32, 32) and len(data.labels) == 20
    assert int(data.images[:, :, :2].max()) == 0  # black border
    small = load_data(DataConfig(name="mnist", path=str(path), size=16), "train")
    assert small.shape == (1, 16, 16) and small.images.dtype == torch.uint8
    expected = data.images[:3].float().unflatten(2, (16, 2)).unflatten(4, (16, 2)).mean((3, 5))  # 2x2 area average
    assert torch.equal(small.images[:3], expected.round().to(torch.uint8))


def test_cifar_packed_jpeg_npz(tmp_path):
    rng = np.random.default_rng(1)
    blobs, offsets = [], [0]
    ramp = np.linspace(0, 200, 32, dtype=np.float32)
    pixels = (ramp[None, :, None, None] + rng.integers(0, 55, (3, 1, 1, 3))).astype(np.uint8)  # smooth: JPEG keeps it
    pixels = np.broadcast_to(pixels, (3, 32, 32, 3)).copy()
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))
    path = tmp_path / "cifar.npz"
    np.savez(path, train_jpeg=np.concatenate(blobs), train_offsets=np.array(offsets), train_labels=np.array([3, 1, 4]))
    data = load_data(DataConfig(name="cifar10", path=str(path)), "train")
    assert data.shape == (3, 32, 32) and data.labels.tolist() == [3, 1, 4]
    assert (data.images.float() - torch.from_numpy(pixels).permute(0, 3, 1, 2).float()).abs().mean() < 3
    with pytest.raises(ErasureError, match="lacks the array"):
        load_data(DataConfig(name="cifar10", path=str(path)), "test")


def test_image_folder(tmp_path):
    for label in range(10):
        folder = tmp_path / "train" / str(label)
        folder.mkdir(parents=True)
        Image.fromarray(np.full((28, 28), label * 20, np.uint8)).save(folder / "a.png")
    data = load_data(DataConfig(name="mnist", path=str(tmp_path)), "train")
    assert data.labels.tolist() == list(range(10)) and data.shape == (1, 32, 32)
    with pytest.raises(ErasureError, match="image folder .* does not exist"):
        load_data(DataConfig(name="mnist", path=str(tmp_path)), "test")


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(ErasureError, match="neither an .npz file nor an image folder"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path / "nope.npz")), "train")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(ErasureError, match="could not be read"):
        load_data(DataConfig(name="cifar10", path=str(corrupt)), "train")


def test_offline_download_failure_points_at_data_path(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(ErasureError, match="data.path="):
        load_data(DataConfig(name="mnist", download_root=str(tmp_path)), "train")


def test_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_model_range(x)), x)
