"""Image-classification datasets as in-memory uint8 tensors.

Every dataset the DDPM path uses fits in memory (CIFAR-10's train split is 150 MB), so a
dataset is simply ``images`` (N, C, H, W uint8) and ``labels`` (N,). Batches are drawn by
index with a seeded generator, which makes runs reproducible and resumable bit for bit
and lets the data live on the GPU.

Sources:
- ``digits``: scikit-learn's embedded 8x8 digits (offline, for the demo and tests).
- ``mnist``: torchvision's download, or a local ``.npz`` (x_train, y_train, x_test, y_test)
  or image folder; padded from 28 to 32 px so the UNet can halve it three times.
- ``cifar10``: torchvision's download, or a local ``.npz`` (plain arrays or packed JPEGs:
  ``{split}_jpeg``, ``{split}_offsets``, ``{split}_labels``) or image folder.
An image folder is ``{split}/{class_name}/*.png`` (or .jpg), class folders in label order.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from erasure.core.config import DataConfig
from erasure.core.errors import ErasureError

CLASS_NAMES = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


@dataclass
class ImageData:
    """Images (N, C, H, W) uint8 with integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, keep: torch.Tensor) -> ImageData:
        """The images whose ``keep`` mask (or index tensor) is set."""
        return ImageData(self.images[keep], self.labels[keep], self.class_names)

    def of_classes(self, classes: list[int]) -> ImageData:
        """Only the images of the given classes."""
        return self.subset(torch.isin(self.labels, torch.tensor(classes)))


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the diffusion model works in."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def load_data(config: DataConfig, split: str = "train") -> ImageData:
    """Load ``split`` ('train' or 'test') of the configured dataset."""
    if split not in ("train", "test"):
        raise ErasureError(f"unknown split '{split}'; use 'train' or 'test'.")
    if config.name == "digits":
        data = _digits(split)
    elif config.path is not None:
        data = _local(Path(config.path).expanduser(), split, CLASS_NAMES[config.name])
    else:
        data = _torchvision(config.name, Path(config.download_root).expanduser(), split)
    if config.name == "mnist" and data.images.shape[-1] == 28:
        data.images = F.pad(data.images, (2, 2, 2, 2))  # black border: 28 -> 32 px
    if config.size is not None and data.images.shape[-1] != config.size:
        resized = F.interpolate(data.images.float(), size=(config.size, config.size), mode="area")
        data.images = resized.round().clamp(0, 255).to(torch.uint8)
    return data


def _digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    # sklearn ships no split: a fixed permutation, 80% train / 20% test.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    keep = order[:cut] if split == "train" else order[cut:]
    return ImageData(images[keep], labels[keep], CLASS_NAMES["digits"])


def _torchvision(name: str, root: Path, split: str) -> ImageData:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        ds = cls(str(root), train=split == "train", download=True)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
        raise ErasureError(
            f"could not download {name} to '{root}' ({e}). Offline? Point data.path at a local copy "
            f"(.npz or image folder), e.g. data.path=/data/{name}.npz"
        ) from None
    images = torch.as_tensor(np.asarray(ds.data))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return ImageData(images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64), CLASS_NAMES[name])


def _local(path: Path, split: str, class_names: list[str]) -> ImageData:
    if path.is_dir():
        return _image_folder(path / split, class_names)
    if path.suffix != ".npz" or not path.is_file():
        raise ErasureError(f"data.path '{path}' is neither an .npz file nor an image folder.")
    try:
        arrays = np.load(path, allow_pickle=False)
        if f"{split}_jpeg" in arrays:
            blob, offsets = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"]
            images = np.stack([_decode(blob[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)])
            labels = arrays[f"{split}_labels"]
        else:
            images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    except KeyError as e:
        raise ErasureError(
            f"'{path}' lacks the array {e}; expected x_{split}/y_{split} or {split}_jpeg/{split}_offsets/{split}_labels."
        ) from None
    except (ValueError, OSError) as e:
        raise ErasureError(f"'{path}' could not be read ({e}); it may be corrupt.") from None
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor[:, None] if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    return ImageData(tensor.contiguous(), torch.from_numpy(labels.astype(np.int64)), class_names)


def _decode(jpeg: np.ndarray) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg.tobytes())).convert("RGB"))


def _image_folder(folder: Path, class_names: list[str]) -> ImageData:
    if not folder.is_dir():
        raise ErasureError(f"image folder '{folder}' does not exist; expected {folder}/<class>/*.png.")
    images, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise ErasureError(f"no images in '{folder / name}'; every class needs a folder of images.")
        for file in files:
            img = Image.open(file)
            images.append(np.asarray(img.convert("L" if img.mode in ("L", "1", "P") else "RGB")))
            labels.append(label)
    stacked = torch.from_numpy(np.stack(images))
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.permute(0, 3, 1, 2)
    return ImageData(stacked.contiguous(), torch.tensor(labels), class_names)


def seeded_perm(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(n) (CPU generator: the same on every machine)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class EpochSampler:
    """Batch indices for step ``s``: epochs of a seeded permutation, so steps map to epochs exactly.

    Like a shuffled ``DataLoader``, the last batch of an epoch holds the remainder
    (``n % batch_size`` images) unless ``drop_last``, which skips it when ``n >= batch_size``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu", drop_last: bool = False) -> None:
        if n < 1:
            raise ErasureError("cannot train on an empty set of images.")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.steps_per_epoch = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)
        self._epoch, self.seeded_perm = -1, torch.empty(0)

    @property
    def smallest_batch(self) -> int:
        """The size of an epoch's last (smallest) batch."""
        return min(self.batch_size, self.n - (self.steps_per_epoch - 1) * self.batch_size)

    def epoch(self, step: int) -> int:
        """The epoch that ``step`` belongs to."""
        return step // self.steps_per_epoch

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, made again on resume from (seed, epoch)
            self._epoch, self.seeded_perm = epoch, seeded_perm(self.n, self.seed * 100_003 + epoch).to(self.device)
        return self.seeded_perm[i * self.batch_size : (i + 1) * self.batch_size]


def random_flip(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image flipped horizontally with probability 0.5 (drawn with ``g``), as torchvision's ``RandomHorizontalFlip``."""
    flip = torch.rand(len(images), generator=g, device=g.device).to(images.device) < 0.5
    return torch.where(flip.view(-1, *[1] * (images.ndim - 1)), images.flip(-1), images)
