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

import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasure.config import FidConfig
from erasure.errors import ErasureError
from erasure.io import load_tensors, save_tensors

INCEPTION = "inception-2048"
CLASSIFIER = "classifier-features"
CACHED_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download name


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with C = 1 or 3 -> uint8 (N, 3, H, W), as Inception wants."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def inception_weights(config: FidConfig) -> str | None:
    """The Inception weights to use: the configured path, torch-fidelity's cached copy, or None."""
    if config.weights:
        path = Path(config.weights).expanduser()
        if not path.is_file():
            raise ErasureError(f"eval.fid.weights '{path}' does not exist.")
        return str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / CACHED_WEIGHTS
    return str(cached) if cached.is_file() else None


def inception_features(images: torch.Tensor, weights: str | None, batch_size: int = 64) -> torch.Tensor:
    """2048-d pool features of torch-fidelity's Inception-v3 (downloads its weights if None)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if weights is not None:
        try:
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it
            raise ErasureError(f"'{weights}' is not a plain state dict of tensors ({e}); refusing to load it.") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights).to(device)
    with torch.no_grad():
        batches = range(0, len(images), batch_size)
        feats = [
            extractor(_rgb(images[i : i + batch_size]).to(device))[0].double().cpu() for i in tqdm(batches, desc="inception", leave=False)
        ]
    return torch.cat(feats)


def inception_fid(
    generated: torch.Tensor, real: torch.Tensor, weights: str | None, batch_size: int = 64, cache: str | Path | None = None
) -> float:
    """Standard FID (2048-d Inception features, torch-fidelity's extractor and formula).

    With ``cache`` set, the real images' features are stored there as safetensors (keyed
    by the images' content), so scoring several models against one reference extracts
    them once.
    """
    real_feats = None
    if cache is not None:
        digest = hashlib.sha256(real.numpy().tobytes()).hexdigest()[:16]
        cache_file = Path(cache) / f"inception2048-{digest}.safetensors"
        if cache_file.is_file():
            real_feats = load_tensors(cache_file)["features"]
    if real_feats is None:
        real_feats = inception_features(real, weights, batch_size)
        if cache is not None:
            save_tensors(cache_file, {"features": real_feats})
    return feature_fid(inception_features(generated, weights, batch_size), real_feats)


def feature_fid(generated: torch.Tensor, real: torch.Tensor) -> float:
    """FID between two feature matrices (rows are samples), with torch-fidelity's formula."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats = [fid_features_to_statistics(f.double().cpu()) for f in (generated, real)]
    return float(fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"])


def fid(
    generated: torch.Tensor,
    real: torch.Tensor,
    config: FidConfig,
    classifier: torch.nn.Module | None = None,
    cache: str | Path | None = None,
) -> tuple[float, str]:
    """(FID, feature-set name) of uint8 images ``generated`` against ``real``."""
    weights = inception_weights(config) if config.features != "classifier" else None
    if config.features == "inception" or (config.features == "auto" and weights is not None):
        return inception_fid(generated, real, weights, config.batch_size, cache), INCEPTION
    if classifier is None:
        raise ErasureError("the classifier-feature FID needs a classifier.")
    device = next(classifier.parameters()).device

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        classifier.eval()
        return torch.cat([classifier.features(images[i : i + 512].to(device)).cpu() for i in range(0, len(images), 512)])

    return feature_fid(features(generated), features(real)), CLASSIFIER
