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
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from erasure.core.errors import ErasureError

T = TypeVar("T")

# ----------------------------------------------------------------------------- value rules
#
# Ranges are checked by field *name*, for every schema at once: a field called ``lr`` must be
# positive in the DDPM, SD and classification configs alike, and a field added later under a
# known name is covered without anyone remembering to. A dotted key (``sample.eta``) narrows a
# rule to fields whose path ends that way; the longest match wins. A schema may add or
# override rules with a ``RULES`` class attribute of the same form.


@dataclasses.dataclass(frozen=True)
class Range:
    """An allowed interval for a number (``None`` = unbounded), with a hint of what the value means."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is not allowed
    high_open: bool = False
    integer_step: int | None = None  # ints only: must be a multiple of this

    def allows(self, value: float) -> bool:
        """Whether ``value`` lies in the interval."""
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return not (self.integer_step and isinstance(value, int) and value % self.integer_step)

    def describe(self) -> str:
        """The interval in words, e.g. 'a number > 0' or 'in [0, 1)'."""
        multiple = f" and a multiple of {self.integer_step}" if self.integer_step else ""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}{multiple}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}{multiple}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}{multiple}"
        return "a finite number" + multiple


def _num(x: float) -> str:
    if x in (2**63, -(2**63)):
        return "2**63" if x > 0 else "-2**63"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1)  # [0, 1]
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True)  # (0, 1)
RATIO = Range(0, 1, low_open=True)  # (0, 1]
SEED = Range(0, 2**63, high_open=True)  # torch.Generator.manual_seed takes a 64-bit value; numpy wants < 2**63
INT64 = Range(-(2**63), 2**63, high_open=True)  # every int: larger ones overflow in torch

RULES: dict[str, Range] = {
    # optimisation
    "lr": POSITIVE,
    "steps": AT_LEAST_ONE,  # zero steps would mark an untrained model as finished
    "epochs": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "eval_batch_size": AT_LEAST_ONE,
    "batches": AT_LEAST_ONE,
    "warmup_steps": NON_NEGATIVE,
    "warmup_epochs": NON_NEGATIVE,
    "no_l1_epochs": NON_NEGATIVE,
    "grad_clip": NON_NEGATIVE,  # 0 turns clipping off
    "weight_decay": NON_NEGATIVE,
    "momentum": Range(0, 1, high_open=True),
    "ema_decay": OPEN_FRACTION,
    "class_dropout": Range(0, 1, high_open=True),  # 1 would leave no conditional training at all
    "alpha": NON_NEGATIVE,
    "iu.alpha": POSITIVE,  # alpha 0 would return the original model as if unlearned
    "gamma": POSITIVE,  # the multistep lr factor
    "l1.gamma": NON_NEGATIVE,
    "damping": POSITIVE,
    "samples": AT_LEAST_ONE,
    "checkpoint_every": NON_NEGATIVE,  # 0: only on interruption
    "log_every": AT_LEAST_ONE,
    "milestones": AT_LEAST_ONE,
    "seed": SEED,
    # masks and splits
    "ratio": RATIO,
    "fraction": OPEN_FRACTION,
    "val_size": NON_NEGATIVE,
    "train_limit": AT_LEAST_ONE,
    "test_limit": AT_LEAST_ONE,
    "class_index": NON_NEGATIVE,
    "forget_class": NON_NEGATIVE,
    # models and data
    "channels": AT_LEAST_ONE,
    "layers_per_block": AT_LEAST_ONE,
    "norm_groups": AT_LEAST_ONE,
    "num_train_timesteps": Range(2),
    "width": AT_LEAST_ONE,
    "size": Range(4),
    "resolution": Range(64, integer_step=8),  # the SD VAE downsamples by 8
    # sampling and generation
    "guidance": NON_NEGATIVE,
    "start_guidance": NON_NEGATIVE,
    "eta": NON_NEGATIVE,  # ESD's negative-guidance strength
    "sample.eta": FRACTION,  # DDIM: 0 deterministic, 1 DDPM-like
    "esd_eta": NON_NEGATIVE,
    "ddim_steps": AT_LEAST_ONE,
    "images_per_set": AT_LEAST_ONE,
    "samples_per_class": AT_LEAST_ONE,
    "grid_samples": AT_LEAST_ONE,
    "real_images": AT_LEAST_ONE,
}

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def _rule(path: str, rules: dict[str, Range]) -> Range | None:
    parts = path.split(".")
    for i in range(len(parts)):
        rule = rules.get(".".join(parts[i:]))
        if rule is not None:
            return rule
    return None


def _example(schema: type, path: str) -> Any:
    """The default of ``path`` in ``schema``, to suggest a valid value."""
    value: Any = schema()
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def check_values(config: Any, rules: dict[str, Range] | None = None) -> None:
    """Check every number of ``config`` (a dataclass, recursively) against :data:`RULES`, and every ``device``.

    Floats must be finite and ints fit in 64 bits; named fields must lie in their range.
    The error names the key, the value and a valid example.
    """
    schema = type(config)
    rules = {**RULES, **getattr(schema, "RULES", {}), **(rules or {})}

    def visit(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, path = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                visit(value, path + ".")
            elif f.name == "device" and isinstance(value, str):
                check_device(value, path)
            else:
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        _check_number(v, path, _rule(path, rules), schema, isinstance(value, list))

    visit(config, "")


def _check_number(value: float, path: str, rule: Range | None, schema: type, in_list: bool = False) -> None:
    example = _example(schema, path)
    if in_list:
        fix = f" (e.g. {path}={example})" if isinstance(example, list) and example else ""
        what, must = f"holds {value}", "every entry must be"
    else:
        fix = f" (e.g. {path}={example})" if isinstance(example, (int, float)) and not isinstance(example, bool) else ""
        what, must = f"is {value}", "it must be"
    if isinstance(value, float) and not math.isfinite(value):
        raise ErasureError(f"config key '{path}' {what}; {must} {rule.describe() if rule else 'a finite number'}{fix}.")
    if isinstance(value, int) and not INT64.allows(value):
        raise ErasureError(f"config key '{path}' {what}, too large for a 64-bit integer; {must} {(rule or INT64).describe()}{fix}.")
    if rule is not None and not rule.allows(value):
        raise ErasureError(f"config key '{path}' {what}; {must} {rule.describe()}{fix}.")


def check_device(value: str, where: str = "device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, and a CUDA device only where one exists."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise ErasureError(f"config key '{where}' is {value!r}; choose auto, cpu, cuda or cuda:N (e.g. {where}=auto).")
    if value.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ErasureError(f"config key '{where}' is {value!r}, but this machine has no CUDA GPU; use {where}=cpu (or auto).")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= count:
            raise ErasureError(f"config key '{where}' is {value!r}, but this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1}).")


@dataclass
class RunConfig:
    """Where and how a run executes: the top-level keys every path's schema starts with."""

    workdir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # bf16 autocast; fp16 would need loss scaling
    log_with: str = "none"  # experiment trackers: none | tensorboard | wandb, or several comma-separated (erasure.core.tracking)
    gpu_recipe: bool = False  # set by GPU-sized configs: starting one on a CPU warns instead of running silently for days


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
        if len(errors) == 1:
            raise ErasureError(errors[0])
        kinds = [
            f"one of {', '.join(map(repr, typing.get_args(a)))}" if typing.get_origin(a) is Literal else getattr(a, "__name__", str(a))
            for a in args
        ]
        raise ErasureError(f"config key '{where}' is {value!r}; it must be {' or '.join(k for k in kinds if k != 'NoneType')}.")
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
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ErasureError(f"unknown config key '{prefix}{key}'.{_closest(key, list(fields))}")
        factory = fields[key].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            default = factory()
            if dataclasses.is_dataclass(default):
                # A section given in part keeps the schema's defaults for the rest: those of the
                # field (e.g. GA's 5 epochs), which may differ from its section class's own.
                value = _merge(to_dict(default), value)
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
    """Defaults, then the YAML file (after the file its ``base`` key names), then ``key=value`` overrides; validated against ``schema``.

    ``schema`` is a dataclass. Every value is checked against the rules of
    :func:`check_values` (ranges by field name, finiteness, devices); then, if it has a
    ``validate()`` method, that runs last for checks that span keys.
    """
    values = _read_yaml(Path(path)) if path is not None else {}
    return _checked(schema, values, overrides)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's values; a top-level ``base: other.yaml`` (relative to the file) is read first and updated by the rest.

    So a variant states only what it changes (``cifar10_random50_fast.yaml`` is the random-10%
    fast config with another forget fraction and workdir).
    """
    if not path.is_file():
        # The shipped configs name each other (concept specs) from the repository root.
        here = f" in the current folder ({Path.cwd()}); run from the repository root or give an absolute path"
        where = "" if path.is_absolute() else here
        raise ErasureError(f"config file '{path}' does not exist{where}.")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ErasureError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ErasureError(f"config file '{path}' must hold a mapping at the top level.")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ErasureError(f"config file '{path}': 'base' must name another config file, got {base!r}.")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise ErasureError(f"config file '{path}': its 'base' chain comes back to '{base_path}'.")
    return _merge(_read_yaml(base_path, (*seen, path.resolve())), loaded)


def with_overrides(config: T, overrides: list[str] | tuple[str, ...]) -> T:
    """``config`` with ``key=value`` overrides applied, checked exactly as :func:`load_config` checks a loaded one."""
    return _checked(type(config), to_dict(config), overrides)


def _checked(schema: type[T], values: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> T:
    for text in overrides:
        values = _merge(values, parse_override(text))
    config = _build(schema, values)
    check_values(config)
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
