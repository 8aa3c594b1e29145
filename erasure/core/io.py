"""Atomic file writes and training checkpoints.

Every output is written to a temporary name in the same folder and renamed into place, so
an interrupted job leaves either the old file or the new one, never half of one.
Checkpoints hold safetensors for weights and ``weights_only`` torch files for optimizer
state, so nothing here ever unpickles arbitrary objects.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from erasure.core.errors import ErasureError

_UMASK = os.umask(0)
os.umask(_UMASK)


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # EFBIG: a file-size limit (ulimit -f) says the same


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def free_space(path: str | Path) -> int | None:
    """Bytes free on the filesystem of ``path`` (or of its nearest existing parent), None if unknown."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_error(path: str | Path, e: OSError, need: int | None = None) -> ErasureError:
    """One clear message for a write that ran out of space: which file, how much space is free there (and needed)."""
    free = free_space(path)
    room = f"{_mib(free)} free there" if free is not None else "free space unknown"
    wanted = f", {_mib(need)} needed" if need else ""
    return ErasureError(
        f"cannot write '{path}': {e.strerror or e} ({room}{wanted}). Free some space (or use another workdir) and rerun "
        "the same command; finished work and the last checkpoint are kept."
    )


@contextmanager
def write_errors(path: str | Path, need: int | None = None) -> Iterator[None]:
    """Turn a full disk (or quota, or file-size limit) met while writing ``path`` into :func:`write_error`'s message.

    Other OS errors (no permission, a file in the way) pass through unchanged: the command
    line's error boundary already names their path and fix, and ``--debug`` shows them.
    """
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise write_error(path, e, need) from None
        raise


def make_folder(folder: str | Path) -> Path:
    """``mkdir -p``, with a full disk as a clear error."""
    folder = Path(folder)
    with write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def atomic_path(path: str | Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A failed write removes the temporary file; a full disk raises one :class:`ErasureError`
    naming ``path`` and the free space (and ``need``, the bytes it was writing).
    """
    path = Path(path)
    make_folder(path.parent)
    with write_errors(path, need):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with write_errors(path, need):
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with a clear error when it is corrupt."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ErasureError(f"'{path}' is not valid JSON ({e}); delete it and rerun.") from None


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _write_safetensors(file: Any, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write the safetensors format to an open binary file, byte-for-byte the same for the same inputs.

    safetensors' own writer keeps the metadata in a hash map whose order changes from
    process to process, so identical masks and deltas differed byte-wise. Here the metadata
    is sorted and tensors are laid out as safetensors does (larger items first, then by
    name, so every tensor stays aligned); tensors are copied to the CPU one at a time.
    """
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"cannot save '{name}': dtype {t.dtype} is not supported")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    file.write(struct.pack("<Q", len(blob)))
    file.write(blob)
    for name in order:
        t = tensors[name].detach()
        if t.numel():
            file.write(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors to safetensors atomically; the same tensors and metadata always give the same bytes."""
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_path(path, need) as tmp, open(tmp, "wb") as f:
        _write_safetensors(f, tensors, metadata)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ErasureError(f"'{path}' does not exist.")
    try:
        device = torch.device(device)
        # safetensors accepts "cpu" but not "cpu:0", which accelerate reports in multi-process CPU runs.
        return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ErasureError(f"'{path}' is not a readable safetensors file ({e}); it may be corrupt.") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ErasureError(f"'{path}' is not a readable safetensors file ({e}); it may be corrupt.") from None


def json_metadata(metadata: dict[str, str], key: str, path: str | Path, kind: type) -> Any:
    """A JSON value of a safetensors file's metadata, or a clear error naming the file and key."""
    if key not in metadata:
        raise ErasureError(f"'{path}' has no '{key}' in its metadata; it is damaged or was not written by erasure. Make it again.")
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as e:
        raise ErasureError(f"the '{key}' metadata of '{path}' is not valid JSON ({e}); the file is damaged. Make it again.") from None
    if not isinstance(value, kind):
        raise ErasureError(f"the '{key}' metadata of '{path}' is a {type(value).__name__}, not a {kind.__name__}; the file is damaged.")
    return value


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], extra: dict[str, Any]) -> None:
    """Write ``folder`` = {name}.safetensors for each state dict, optimizer.safetensors + optimizer.json, state.json.

    ``tensors`` maps a file stem (``model``, ``ema``) to a flat state dict; ``extra`` holds
    the optimizer state dict (``optimizer``) and anything JSON-able. The folder is built
    beside the old one and swapped in, so a crash mid-save keeps the previous checkpoint;
    a failed write (a full disk) removes the half-built folder and raises one clear error.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    need = sum(t.numel() * t.element_size() for state in tensors.values() for t in state.values())
    try:
        with write_errors(folder, need):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for stem, state in tensors.items():
                with open(tmp / f"{stem}.safetensors", "wb") as f:
                    _write_safetensors(f, state, None)
            extra = dict(extra)
            if "optimizer" in extra:
                # Tensors in safetensors and the rest in JSON rather than torch.save: no pickle, the same bytes
                # for the same state, and a full disk surfaces as an OSError instead of torch's "unexpected pos".
                optimizer_tensors, optimizer_rest = _split_tensors(extra.pop("optimizer"))
                with open(tmp / "optimizer.safetensors", "wb") as f:
                    _write_safetensors(f, optimizer_tensors, None)
                (tmp / "optimizer.json").write_text(json.dumps(optimizer_rest))
            (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
            old = folder.with_name(folder.name + ".old")
            if folder.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_TENSOR = "__tensor__"


def _split_tensors(value: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """A nested structure (an optimizer state dict) as flat tensors plus a JSON-able skeleton that names them."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(v: Any, key: str) -> Any:
        if torch.is_tensor(v):
            tensors[key] = v
            return {_TENSOR: key}
        if isinstance(v, dict):
            # JSON keys are strings; optimizer state is keyed by int parameter index, so keep the type.
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(x, f"{key}.{i}")] for i, (k, x) in enumerate(v.items())]}
        if isinstance(v, (list, tuple)):
            return {"__tuple__" if isinstance(v, tuple) else "__list__": [walk(x, f"{key}.{i}") for i, x in enumerate(v)]}
        return v

    return tensors, walk(value, prefix or "o")


def _join_tensors(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The inverse of :func:`_split_tensors`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if "__dict__" in skeleton:
            return {_join_tensors(tensors, k): _join_tensors(tensors, v) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(_join_tensors(tensors, x) for x in skeleton["__tuple__"])
        if "__list__" in skeleton:
            return [_join_tensors(tensors, x) for x in skeleton["__list__"]]
    return skeleton


def load_checkpoint(folder: str | Path) -> dict[str, Any] | None:
    """The latest checkpoint in ``folder`` (or its ``.old`` twin after a crash mid-save), or None."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(folder.name + ".old")):
        if not (candidate / "state.json").is_file():
            continue
        state = read_json(candidate / "state.json")
        for file in candidate.glob("*.safetensors"):
            if file.stem != "optimizer":
                state[file.stem] = load_tensors(file)
        if (candidate / "optimizer.json").is_file():
            state["optimizer"] = _join_tensors(load_tensors(candidate / "optimizer.safetensors"), read_json(candidate / "optimizer.json"))
        elif (candidate / "optimizer.pt").is_file():  # checkpoints written before optimizer.json
            state["optimizer"] = torch.load(candidate / "optimizer.pt", map_location="cpu", weights_only=True)
        return state
    return None


def torchvision_weights(weights: Any, path: str | None, name: str, offline_hint: str) -> dict[str, torch.Tensor]:
    """A torchvision model's pretrained state dict, only ever unpickled with ``weights_only=True`` (cannot run code).

    ``path`` is a local state dict; None is the file of ``weights`` (a torchvision ``WeightsEnum``
    member, e.g. ``ResNet50_Weights.IMAGENET1K_V2``) in the torch hub cache, downloaded if
    missing. torchvision publishes only an 8-hex-digit SHA-256 prefix in the file name
    (``resnet50-11ad3fa6.pth``): a cached file must match it, which catches a replaced or
    truncated download before it is opened. ``name`` names the weights in errors;
    ``offline_hint`` says how to pass a local copy.
    """
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ErasureError(f"{name}: '{file}' does not exist. {offline_hint}")
    else:
        url = weights.url
        file = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        prefix = file.stem.rsplit("-", 1)[1]
        if not file.is_file():
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(file), hash_prefix=prefix, progress=False)
            except Exception as e:  # noqa: BLE001 - offline: network errors of every kind
                raise ErasureError(f"could not download the {name} ({type(e).__name__}). Offline: {offline_hint}") from None
    data = file.read_bytes()  # read once: the bytes we check are the bytes we load
    if not path and not hashlib.sha256(data).hexdigest().startswith(prefix):
        raise ErasureError(
            f"the cached {name} '{file}' do not match torchvision's published hash prefix {prefix}; refusing to load them. "
            f"Delete that file to download it again, or pass a copy you trust. {offline_hint}"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refuse anything that is not a plain state dict
        raise ErasureError(f"'{file}' is not a state dict of tensors ({str(e).splitlines()[0]}); refusing to load it.") from None
