"""FID of generated images against real ones.

Two feature sets, always named in results:
- ``inception``: the standard 2048-d Inception-v3 pool features through torch-fidelity.
  Offline, pass a local weights file (``eval.fid.weights``); it is first opened with
  ``weights_only=True`` so a tampered file is refused before torch-fidelity loads it.
- ``classifier``: the penultimate features of the project's own classifier, a fallback
  when no Inception weights can be had. Its values are not comparable to published FIDs.
``auto`` uses Inception when weights are given or already cached, else the classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from erasure.config import FidConfig
from erasure.errors import ErasureError

INCEPTION = "inception-2048"
CLASSIFIER = "classifier-features"
CACHED_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download name


class _RGBImages(Dataset):
    """uint8 (N, C, H, W) as torch-fidelity wants them: 3-channel uint8 per item."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.images[i]
        return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def inception_weights(config: FidConfig) -> str | None:
    """The Inception weights to use: the configured path, torch-fidelity's cached copy, or None."""
    if config.weights:
        path = Path(config.weights).expanduser()
        if not path.is_file():
            raise ErasureError(f"eval.fid.weights '{path}' does not exist.")
        return str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / CACHED_WEIGHTS
    return str(cached) if cached.is_file() else None


def inception_fid(generated: torch.Tensor, real: torch.Tensor, weights: str | None, batch_size: int = 64) -> float:
    """Standard FID (2048-d Inception features) via torch-fidelity; downloads weights if None."""
    import torch_fidelity

    if weights is not None:
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it
            raise ErasureError(f"'{weights}' is not a plain state dict of tensors ({e}); refusing to load it.") from None
    metrics = torch_fidelity.calculate_metrics(
        input1=_RGBImages(generated),
        input2=_RGBImages(real),
        fid=True,
        feature_extractor_weights_path=weights,
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        cache=False,
        verbose=False,
    )
    return float(metrics["frechet_inception_distance"])


def feature_fid(generated: torch.Tensor, real: torch.Tensor) -> float:
    """FID between two feature matrices (rows are samples), with torch-fidelity's formula."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f.double().cpu()) for f in (generated, real)]
    return float(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])


def fid(generated: torch.Tensor, real: torch.Tensor, config: FidConfig, classifier: torch.nn.Module | None = None) -> tuple[float, str]:
    """(FID, feature-set name) of uint8 images ``generated`` against ``real``."""
    weights = inception_weights(config) if config.features != "classifier" else None
    if config.features == "inception" or (config.features == "auto" and weights is not None):
        return inception_fid(generated, real, weights, config.batch_size), INCEPTION
    if classifier is None:
        raise ErasureError("the classifier-feature FID needs a classifier.")
    device = next(classifier.parameters()).device

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        classifier.eval()
        return torch.cat([classifier.features(images[i : i + 512].to(device)).cpu() for i in range(0, len(images), 512)])

    return feature_fid(features(generated), features(real)), CLASSIFIER
