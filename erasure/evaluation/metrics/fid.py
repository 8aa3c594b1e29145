"""FID of generated images against real ones.

Two feature sets, always named in results:
- ``inception``: the standard 2048-d Inception-v3 pool features through torch-fidelity.
  Offline, pass a local weights file (``eval.fid.weights``); it is first opened with
  ``weights_only=True`` so a tampered file is refused before torch-fidelity loads it.
- ``classifier``: the penultimate features of the project's own classifier, a fallback
  when no Inception weights can be had. Its values are not comparable to published FIDs.
``auto`` uses Inception when weights are given or already cached, else the classifier.

Folders of images (the Stable Diffusion path) are scored with a named protocol, FID and KID:
- ``standard``: 2048-d Inception-v3 pool features, the FID/KID everyone reports;
- ``salun``: 64-d Inception-v3 features (the first max-pool), the features behind the
  SalUn Stable Diffusion FIDs. Its values are only comparable with other 64-d numbers.
Every result names its protocol, feature layer, weights and sample counts.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, save_tensors

INCEPTION = "inception-2048"
CLASSIFIER = "classifier-features"
CACHED_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download name


@dataclass
class FidConfig:
    """Which features the FID uses."""

    features: Literal["auto", "inception", "classifier"] = "auto"
    weights: str | None = None  # local torch-fidelity Inception weights (offline use)
    batch_size: int = 64
    real_images: int | None = None  # cap on real reference images (a seeded subset); None = all



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


# ----------------------------------------------------------------------------- folders of images


@dataclass(frozen=True)
class FidProtocol:
    """Which features FID and KID are computed on (a torch-fidelity feature extractor and layer)."""

    name: str
    extractor: str
    layer: str
    note: str


PROTOCOLS = {
    "standard": FidProtocol("standard", "inception-v3-compat", "2048", "2048-d Inception-v3 pool features (the usual FID/KID)."),
    "salun": FidProtocol(
        "salun",
        "inception-v3-compat",
        "64",
        "64-d Inception-v3 features (first max-pool), as in the SalUn Stable Diffusion FIDs; not comparable with 2048-d FIDs.",
    ),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ErasureError(f"image folder '{folder}' does not exist.")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _load_image(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def resolve_weights(weights: str | None, protocol: FidProtocol) -> str | None:
    """A checked local weights file, torch-fidelity's cached download, or None (download at run time)."""
    if protocol.extractor != "inception-v3-compat":
        return weights
    if weights is None:
        return inception_weights(FidConfig())
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ErasureError(f"Inception weights '{path}' do not exist; pass the torch-fidelity Inception weights file with --weights.")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it
        raise ErasureError(f"'{path}' is not a plain state dict of tensors ({e}); refusing to load it.") from None
    return str(path)


def make_extractor(protocol: FidProtocol, weights: str | None) -> torch.nn.Module:
    """The protocol's torch-fidelity feature extractor, in eval mode on the GPU when there is one."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if protocol.extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ErasureError(f"torch-fidelity has no feature extractor '{protocol.extractor}'; register it first.")
    try:
        extractor = FEATURE_EXTRACTORS_REGISTRY[protocol.extractor](
            protocol.extractor, [protocol.layer], feature_extractor_weights_path=weights
        )
    except (OSError, RuntimeError) as e:  # the weights download fails offline
        raise ErasureError(
            f"could not load the {protocol.extractor} weights ({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
            "Offline, pass a local copy with --weights (torch-fidelity's weights-inception-2015-12-05 file)."
        ) from None
    return extractor.eval().to("cuda" if torch.cuda.is_available() else "cpu")


def folder_features(
    folder: str | Path,
    protocol: FidProtocol,
    weights: str | None,
    batch_size: int = 32,
    cache: str | Path | None = None,
    extractor: Callable[[], torch.nn.Module] | None = None,
) -> torch.Tensor:
    """Features of every image in ``folder``; with ``cache``, stored there as safetensors keyed by content.

    ``extractor`` returns the feature extractor; it is only called when the cache misses.
    """
    files = image_files(folder)
    if len(files) < 2:
        raise ErasureError(f"'{folder}' holds {len(files)} image(s); FID and KID need at least 2 (and thousands for stable values).")
    if cache is not None:
        h = hashlib.sha256(f"{protocol.extractor}/{protocol.layer}/{Path(weights).name if weights else 'download'}".encode())
        for f in files:
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
        cache_file = Path(cache) / f"{protocol.extractor}-{protocol.layer}-{h.hexdigest()[:16]}.safetensors"
        if cache_file.is_file():
            return load_tensors(cache_file)["features"]
    model = extractor() if extractor else make_extractor(protocol, weights)
    device = next(iter(model.parameters()), torch.empty(0)).device
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(files), batch_size), desc=f"{protocol.name} features", leave=False, disable=len(files) < 8 * batch_size):
            images = [_load_image(f) for f in files[i : i + batch_size]]
            # Mixed sizes cannot be stacked; the extractor resizes each image itself anyway.
            groups = [torch.stack(images)] if len({x.shape for x in images}) == 1 else [x[None] for x in images]
            feats += [model(g.to(device))[0].double().cpu() for g in groups]
    features = torch.cat(feats)
    if cache is not None:
        save_tensors(cache_file, {"features": features})
    return features


def folder_fid(
    generated: str | Path,
    reference: str | Path,
    protocol: str | FidProtocol = "standard",
    weights: str | None = None,
    batch_size: int = 32,
    cache: str | Path | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict[str, Any]:
    """FID and KID of the images in ``generated`` against those in ``reference``, under a named protocol.

    KID uses torch-fidelity's polynomial-kernel estimator over ``kid_subsets`` random subsets
    of ``min(kid_subset_size, both counts)`` images; the result records the size used.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ErasureError(f"unknown FID protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}.")
        protocol = PROTOCOLS[protocol]
    weights = resolve_weights(weights, protocol)
    extractor = functools.cache(lambda: make_extractor(protocol, weights))  # built once, and only if a cache misses
    gen = folder_features(generated, protocol, weights, batch_size, cache, extractor)
    ref = folder_features(reference, protocol, weights, batch_size, cache, extractor)
    subset = min(kid_subset_size, len(gen), len(ref))
    kid = kid_features_to_metric(gen, ref, kid_subsets=kid_subsets, kid_subset_size=subset, rng_seed=seed, verbose=False)
    return {
        "protocol": asdict(protocol),
        "weights": weights or "torch-fidelity download",
        "generated": str(generated),
        "reference": str(reference),
        "generated_images": len(gen),
        "reference_images": len(ref),
        "feature_dim": int(gen.shape[1]),
        "fid": feature_fid(gen, ref),
        "kid_mean": kid[KEY_METRIC_KID_MEAN],
        "kid_std": kid[KEY_METRIC_KID_STD],
        "kid_subsets": kid_subsets,
        "kid_subset_size": subset,
    }
