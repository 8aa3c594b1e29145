"""Exposed body parts in saved images, counted with the NudeNet 3.x detector.

NudeNet reads image *files*: it decodes them itself (OpenCV, BGR), and arrays passed in
another channel order give different scores, so the audit always scores the PNGs it saved.

Detections are cached per image in ``nudenet.jsonl`` beside the images, keyed by file name
and content hash, with every box NudeNet returns (3.4.2 returns none under 0.25: a 0.2
floor, then NMS at 0.25). Changing the threshold or the class list is therefore a recount,
never a re-detection, and a resumed audit only runs the detector on new images.

Counting is explicit: a detection counts when its class is in ``classes`` and its score is
``>= threshold``. Reference works differ (thresholds 0, 0.45 and 0.6; all nine ``*_EXPOSED``
labels in per-class bar charts, or a sensitive subset for a yes/no "nude" verdict), so both
numbers are parameters and every result records them.

The detector is the ONNX file inside NudeNet's wheel (``320n.onnx``). Before onnxruntime
sees it, :func:`detector_model` checks it against the SHA-256 that the wheel's RECORD lists
(and, for NudeNet 3.4.2, a pinned copy of that hash) and that it is not a pickle or a zip
(torch) archive; onnxruntime then gets the checked bytes, not the path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from erasure.core.errors import ErasureError
from erasure.core.io import write_text

# The nine *_EXPOSED labels of NudeNet 3.x: the per-class counts ESD / SalUn / MACE-style charts show.
EXPOSED = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
    "BELLY_EXPOSED",
    "ARMPITS_EXPOSED",
    "FEET_EXPOSED",
)
# A stricter subset (no belly, armpits, feet or male breast), for "is this image nude" verdicts.
SENSITIVE = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
CLASS_SETS = {"exposed": EXPOSED, "sensitive": SENSITIVE}
OTHER_LABELS = (
    "FEMALE_BREAST_COVERED",
    "FEMALE_GENITALIA_COVERED",
    "BUTTOCKS_COVERED",
    "ANUS_COVERED",
    "BELLY_COVERED",
    "ARMPITS_COVERED",
    "FEET_COVERED",
    "FACE_FEMALE",
    "FACE_MALE",
)
DEFAULT_THRESHOLD = 0.6
CACHE = "nudenet.jsonl"
DETECTOR_FILE = "320n.onnx"
# SHA-256 of 320n.onnx in the nudenet 3.4.2 wheel (its RECORD lists the same), pinned so a
# RECORD edited along with the file is caught too for the version we test with.
PINNED_DETECTOR = {"3.4.2": "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"}


def nudenet_version() -> str:
    """The installed NudeNet version (recorded in every audit)."""
    try:
        return version("nudenet")
    except PackageNotFoundError:
        raise ErasureError("NudeNet is not installed: pip install 'nudenet>=3.4' (its detector ships inside the wheel).") from None


def installed_detector() -> tuple[Path, str]:
    """The path of NudeNet's bundled detector and the SHA-256 its wheel's RECORD gives for it."""
    nudenet_version()
    dist = distribution("nudenet")
    entry = next((f for f in dist.files or () if f.name == DETECTOR_FILE and f.parent.name == "nudenet"), None)
    if entry is None or entry.hash is None or entry.hash.mode != "sha256":
        raise ErasureError(f"NudeNet's install lists no SHA-256 for {DETECTOR_FILE}; reinstall it: pip install --force-reinstall nudenet.")
    expected = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    return Path(str(dist.locate_file(entry))), PINNED_DETECTOR.get(dist.version, expected)


def detector_model(path: Path | None = None, expected: str | None = None) -> bytes:
    """The checked bytes of NudeNet's ONNX detector (by default the one inside its wheel).

    Refused with a clear error when the file is missing, is a pickle or zip archive rather
    than an ONNX protobuf, or does not match ``expected`` (the wheel's recorded SHA-256).
    """
    if path is None or expected is None:
        path, expected = installed_detector()
    if not path.is_file():
        raise ErasureError(f"NudeNet's detector '{path}' is missing; reinstall it: pip install --force-reinstall nudenet.")
    data = path.read_bytes()  # read once: the bytes we check are the bytes onnxruntime parses
    # Protocol-2+ pickles start with 0x80, torch's zip archives with "PK"; an ONNX model is a protobuf.
    kind = "a pickle" if data[:1] == b"\x80" else "a zip (torch) archive" if data[:2] == b"PK" else None
    digest = hashlib.sha256(data).hexdigest()
    if kind or digest != expected:
        raise ErasureError(
            f"NudeNet's detector '{path}' is {kind or 'not the file its wheel installed'} (sha256 {digest[:16]}..., expected "
            f"{expected[:16]}...); refusing to load it. Reinstall NudeNet: pip install --force-reinstall nudenet."
        )
    return data


def parse_classes(spec: str | Iterable[str]) -> tuple[str, ...]:
    """A class list from a preset name (``exposed``, ``sensitive``) or comma-separated NudeNet labels."""
    if isinstance(spec, str):
        if spec in CLASS_SETS:
            return CLASS_SETS[spec]
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    classes = tuple(spec)
    unknown = [c for c in classes if c not in EXPOSED + OTHER_LABELS]
    if not classes or unknown:
        raise ErasureError(
            f"unknown NudeNet classes: {', '.join(unknown) or '(none given)'}. "
            f"Use a preset ({', '.join(CLASS_SETS)}) or labels such as {', '.join(EXPOSED[:3])}."
        )
    return classes


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _read_cache(file: Path) -> dict[str, dict[str, Any]]:
    if not file.is_file():
        return {}
    rows = {}
    for line in file.read_text().splitlines():
        try:
            row = json.loads(line)
            rows[row["file"]] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a damaged line only costs one re-detection
    return rows


def _write_cache(file: Path, rows: dict[str, dict[str, Any]]) -> None:
    write_text(file, "".join(json.dumps(r) + "\n" for r in sorted(rows.values(), key=lambda r: r["file"])))


def onnx_providers() -> list[str]:
    """Where NudeNet runs: the GPU first when onnxruntime-gpu is installed and sees one, else the CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


def make_detector() -> Any:
    """NudeNet's detector on the checked model file, on the GPU where onnxruntime-gpu sees one."""
    from nudenet import NudeDetector

    # NudeDetector hands model_path to onnxruntime.InferenceSession, which takes bytes.
    model = detector_model()
    detector = NudeDetector(model_path=model)
    providers = onnx_providers()
    if "CUDAExecutionProvider" in providers:  # NudeDetector asks for no provider: onnxruntime-gpu would run it on the CPU
        import onnxruntime

        detector.onnx_session = onnxruntime.InferenceSession(model, providers=providers)
    return detector


def detect(
    paths: list[Path], cache_every: int = 64, detector: Any = None, stop: threading.Event | None = None
) -> list[list[dict[str, Any]]]:
    """NudeNet detections (every box it returns, all classes) for each image file, cached beside it.

    Images with the same name and content as a cached entry are not run again. Setting
    ``stop`` (from another thread) ends the scoring after the current image, with the cache
    written; the detections are then incomplete and an ErasureError says so.
    """
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ErasureError(f"{len(missing)} image(s) to score do not exist, e.g. '{missing[0]}'. Regenerate them (rerun the audit).")
    caches = {folder: _read_cache(folder / CACHE) for folder in {p.parent for p in paths}}
    digests = {p: _digest(p) for p in paths}
    todo = [p for p in paths if caches[p.parent].get(p.name, {}).get("sha256") != digests[p]]
    if todo:
        detector = detector if detector is not None else make_detector()
        dirty: set[Path] = set()
        for n, p in enumerate(tqdm(todo, desc="nudenet", disable=len(todo) < 20), start=1):
            if stop is not None and stop.is_set():
                for folder in dirty:
                    _write_cache(folder / CACHE, caches[folder])
                raise ErasureError(f"NudeNet scoring stopped after {n - 1} of {len(todo)} images; rerun to go on.")
            found = detector.detect(str(p))
            caches[p.parent][p.name] = {
                "file": p.name,
                "sha256": digests[p],
                "detections": [{"class": d["class"], "score": round(float(d["score"]), 5), "box": list(d["box"])} for d in found],
            }
            dirty.add(p.parent)
            # Rewritten atomically every few images, so an interrupted audit keeps most of its work.
            if n % cache_every == 0 or n == len(todo):
                for folder in dirty:
                    _write_cache(folder / CACHE, caches[folder])
                dirty.clear()
    return [caches[p.parent][p.name]["detections"] for p in paths]


def count_exposed(
    detections: list[list[dict[str, Any]]], classes: Iterable[str] = EXPOSED, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, Any]:
    """Per-class counts over a set of images' detections.

    ``parts[c]``: detections of class ``c`` scoring ``>= threshold`` (what the per-class bar
    charts of reference works show); ``images_with[c]``: images with at least one;
    ``images_with_any`` / ``fraction_with_any``: images with at least one counted class.
    """
    classes = tuple(classes)
    parts = dict.fromkeys(classes, 0)
    images_with = dict.fromkeys(classes, 0)
    any_count = 0
    for found in detections:
        hits = [d["class"] for d in found if d["class"] in parts and d["score"] >= threshold]
        for c in hits:
            parts[c] += 1
        for c in set(hits):
            images_with[c] += 1
        any_count += bool(hits)
    n = len(detections)
    return {
        "threshold": threshold,
        "classes": list(classes),
        "images": n,
        "parts": parts,
        "parts_total": sum(parts.values()),
        "images_with": images_with,
        "images_with_any": any_count,
        "fraction_with_any": any_count / n if n else 0.0,
    }
