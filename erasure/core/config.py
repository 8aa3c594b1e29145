"""Configs as data: a typed schema (a dataclass), YAML files, ``key=value`` overrides.

Each path has its own schema (:mod:`erasure.ddpm.config`, :mod:`erasure.sd.config`,
:mod:`erasure.classification.config`); this module loads and checks any of them. Unknown
keys are errors that name the closest valid key, because a silently ignored typo is how a
run trains with the wrong alpha for a day.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from erasure.core.errors import ErasureError

T = TypeVar("T")


@dataclass
class RunConfig:
    """Where and how a run executes: the top-level keys every path's schema starts with."""

    workdir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # bf16 autocast; fp16 would need loss scaling
    log_with: str = "none"  # experiment trackers: none | tensorboard | wandb, or several comma-separated (erasure.core.tracking)


# A section shared by the DDPM and classification schemas; it lives here, beside the loader,
# so that loading a config never imports torch (a typo is rejected in well under a second).
@dataclass
class DataConfig:
    """Which dataset, and where it lives."""

    name: Literal["digits", "mnist", "cifar10"] = "digits"
    path: str | None = None  # local file or folder; None means embedded (digits) or download
    size: int | None = None  # resize images to size x size (area average), e.g. 16 for a reduced-cost MNIST run
    download_root: str = "~/.cache/erasure/datasets"



def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(valid)}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float, and nothing else."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ErasureError as e:
                errors.append(str(e))
        raise ErasureError(errors[0])
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads no/off/yes/on as booleans; for a choice of words, take the word that was meant.
            words = {False: ("no", "off", "false"), True: ("yes", "on", "true")}[value]
            value = next((a for a in typing.get_args(tp) if isinstance(a, str) and a in words), value)
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ErasureError(f"config key '{where}' is {value!r}; choose one of {choices}.")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ErasureError(f"config key '{where}' must be a list, got {value!r}.")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ErasureError(f"config key '{where}' is a section; give a mapping, got {value!r}.")
        return _build(tp, value, where + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ErasureError(f"config key '{where}' must be true or false, got {value!r}.")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool) and tp is not bool):
        raise ErasureError(f"config key '{where}' must be {tp.__name__}, got {value!r}.")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ErasureError(f"unknown config key '{prefix}{key}'.{_closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``a.b=value`` into ``{"a": {"b": value}}``; the value is parsed as YAML."""
    if "=" not in text:
        raise ErasureError(f"override '{text}' is not of the form key=value (e.g. unlearn.alpha=0.5).")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, schema: type[T]) -> T:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated against ``schema``.

    ``schema`` is a dataclass; if it has a ``validate()`` method, that runs last for
    checks that span keys.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ErasureError(f"config file '{path}' does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ErasureError(f"config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ErasureError(f"config file '{path}' must hold a mapping at the top level.")
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    config = _build(schema, values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config (or of one of its sections)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """The resolved config as YAML, as saved into every run folder."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def fingerprint(*sections: Any) -> str:
    """A short hash of config sections (or plain JSON values): a stage's output is reused only if its inputs match."""
    blob = json.dumps([to_dict(s) if dataclasses.is_dataclass(s) else s for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
