"""Configs as data: a typed schema, YAML files, ``key=value`` overrides.

The schema's defaults are the embedded demo (sklearn's 8x8 digits, CPU-sized), so
``erasure demo`` needs no file. Other experiments are YAML files in ``configs/`` that
override parts of it. Unknown keys are errors that name the closest valid key, because
a silently ignored typo is how a run trains with the wrong alpha for a day.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from erasure.errors import ErasureError

T = TypeVar("T")


@dataclass
class DataConfig:
    """Which dataset, and where it lives."""

    name: Literal["digits", "mnist", "cifar10"] = "digits"
    path: str | None = None  # local file or folder; None means embedded (digits) or download
    size: int | None = None  # resize images to size x size (area average), e.g. 16 for a reduced-cost MNIST run
    download_root: str = "~/.cache/erasure/datasets"


@dataclass
class ModelConfig:
    """The class-conditional UNet (diffusers ``UNet2DModel``)."""

    channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention: bool = False
    norm_groups: int = 8
    num_train_timesteps: int = 1000


@dataclass
class TrainConfig:
    """Base-model (DDPM) training."""

    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    class_dropout: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    seed: int = 0


@dataclass
class ClassifierConfig:
    """The CNN that scores generated images (unlearning accuracy)."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    steps: int = 800
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0


@dataclass
class SampleConfig:
    """DDIM sampling with classifier-free guidance: (1 + w) * cond - w * uncond."""

    steps: int = 25
    guidance: float = 2.0
    eta: float = 0.0


@dataclass
class MaskConfig:
    """The SalUn saliency mask."""

    ratio: float = 0.5  # fraction of weights that may change
    per_layer: bool = False  # threshold each tensor separately instead of globally
    batches: int = 4  # forget batches accumulated into the saliency
    batch_size: int = 128
    guidance: float = 2.0  # the forgetting loss is taken on the guided prediction
    path: str | None = None  # reuse a saved mask instead of computing one


@dataclass
class UnlearnConfig:
    """Erasing one class from the base model."""

    method: str = "salun"
    forget_class: int = 0
    target_shift: int = 1  # misaligned target class = (forget_class + shift) mod classes
    steps: int = 150
    batch_size: int = 64  # per stream: this many forget and this many retain samples
    lr: float = 1e-3
    alpha: float = 1.0  # weight of the retain loss; both losses are per-element means
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    esd_eta: float = 1.0  # ESD negative-guidance strength
    mask: MaskConfig = field(default_factory=MaskConfig)


@dataclass
class FidConfig:
    """Which features the FID uses."""

    features: Literal["auto", "inception", "classifier"] = "auto"
    weights: str | None = None  # local torch-fidelity Inception weights (offline use)
    batch_size: int = 64
    real_images: int | None = None  # cap on real reference images (a seeded subset); None = all


@dataclass
class EvalConfig:
    """Scoring generated images."""

    samples_per_class: int = 100
    grid_samples: int = 6  # images per cell of the comparison grid
    seed: int = 1234
    methods: list[str] = field(default_factory=lambda: ["salun"])
    fid: FidConfig = field(default_factory=FidConfig)


@dataclass
class Config:
    """One experiment: data, base model, classifier, erasure and evaluation."""

    workdir: str = "runs/demo"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # bf16 autocast; fp16 would need loss scaling
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Checks that span keys, so that a bad value fails before any work starts."""
        if not 0.0 < self.unlearn.mask.ratio <= 1.0:
            raise ErasureError("unlearn.mask.ratio must lie in (0, 1].")
        if self.unlearn.target_shift % 10 == 0:
            raise ErasureError("unlearn.target_shift must not map the forgotten class onto itself.")
        if not self.model.channels or any(c % self.model.norm_groups for c in self.model.channels):
            raise ErasureError("model.channels must be non-empty multiples of model.norm_groups.")


# ----------------------------------------------------------------------------- building


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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = Config) -> T:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated against ``schema``.

    ``schema`` is a dataclass (the DDPM :class:`Config` by default); if it has a
    ``validate()`` method, that runs last for checks that span keys.
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
