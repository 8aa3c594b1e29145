"""The whole table from one config: split, original model, each method, metrics, report.

Layout of ``{workdir}``:

    split.safetensors     train / val / forget / retain / test indices (seeded)
    original/             the model trained on all of train (model.safetensors, log.csv, done.json)
    {method}/             one per method: model.safetensors (+ mask.safetensors for salun), done.json
    results.json results.md

Every folder is a :class:`erasure.core.stages.Stage`: a finished one with the same settings is
reused, an interrupted one resumes from its checkpoint, and one finished with other
settings is an error rather than an overwrite.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from erasure.classification.config import ClassificationConfig
from erasure.classification.data import Split, make_split
from erasure.classification.methods import UnlearnContext, get_method
from erasure.classification.metrics import make_table, markdown, score
from erasure.classification.train import build_model, fit, load_weights, save_model
from erasure.core.config import fingerprint, to_dict
from erasure.core.data import load_data
from erasure.core.io import read_json, write_json, write_text
from erasure.core.loop import make_accelerator
from erasure.core.stages import Stage


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def original_stage(config: ClassificationConfig) -> Stage:
    """The model trained on the whole train split (the forget set does not matter to it)."""
    return Stage(Path(config.workdir) / "original", fingerprint(config.data, config.split, config.model, config.train))


def method_stage(config: ClassificationConfig, method: str) -> Stage:
    """One method's folder; its fingerprint covers what it reads, and only its own section of ``unlearn``."""
    if method == "retrain":
        fp = fingerprint(config.data, config.split, config.forget, config.model, config.retrain)
    else:
        u = to_dict(config.unlearn)
        common = {k: v for k, v in u.items() if k != "methods" and not isinstance(v, dict)}
        base = [to_dict(s) for s in (config.data, config.split, config.forget, config.model, config.train)]
        fp = _hash(base, common, method, u.get(method))
    return Stage(Path(config.workdir) / method, fp)


def load_split(config: ClassificationConfig, train_labels: torch.Tensor, test_labels: torch.Tensor) -> Split:
    """The run's split: made once (seeded) and saved, then read back on every rerun."""
    path = Path(config.workdir) / "split.safetensors"
    fp = fingerprint(config.data, config.split, config.forget)
    if path.is_file():
        return Split.load(path, fp)
    split = make_split(train_labels, test_labels, config.split, config.forget)
    split.save(path, fp)
    return split


def run_table(config: ClassificationConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train (or reuse) the original model and every method in ``config.unlearn.methods``; return the table."""
    workdir = Path(config.workdir)
    accelerator = make_accelerator(config.device, config.mixed_precision)
    dev = accelerator.device
    train_data, test_data = load_data(config.data, "train"), load_data(config.data, "test")
    split = load_split(config, train_data.labels, test_data.labels)
    sets = {
        "forget": (train_data.images[split.forget], train_data.labels[split.forget]),
        "retain": (train_data.images[split.retain], train_data.labels[split.retain]),
        "test": (test_data.images[split.test], test_data.labels[split.test]),
        "test_forget": (test_data.images[split.test_forget], test_data.labels[split.test_forget]),
    }
    sets = {k: (x.to(dev), y.to(dev)) for k, (x, y) in sets.items()}
    in_channels, k = train_data.shape[0], train_data.num_classes
    sizes = {name: len(getattr(split, name)) for name in ("train", "val", "forget", "retain", "test", "test_forget")}
    log(f"{config.data.name}: " + ", ".join(f"{name} {n}" for name, n in sizes.items()))

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return score(model, sets, config.eval_batch_size, accelerator, seed=config.split.seed)

    rows: dict[str, dict[str, float]] = {}
    stage = original_stage(config)
    if not stage.done():
        log(f"[original] training -> {stage.folder}")
        stage.begin(config)
        start = time.time()
        model = build_model(config, in_channels, k, config.train.seed).to(dev)
        images, labels = train_data.images[split.train].to(dev), train_data.labels[split.train].to(dev)
        model = fit(model, images, labels, config.train, stage.folder, accelerator, stage.fingerprint, desc="original")
        minutes = (time.time() - start) / 60
        del images, labels
        save_model(model, stage.folder / "model.safetensors")
        stage.finish({"train_minutes": minutes, "metrics": evaluate(model)})
    rows["original"] = read_json(stage.folder / "done.json")["metrics"]
    original = stage.folder / "model.safetensors"

    for name in config.unlearn.methods:
        method_cls = get_method(name)
        stage = method_stage(config, name)
        if not stage.done():
            log(f"[{name}] unlearning -> {stage.folder}")
            stage.begin(config)
            resumed = (stage.checkpoint / "state.json").is_file()
            model = load_weights(build_model(config, in_channels, k, config.train.seed), original).to(dev)
            ctx = UnlearnContext(config, accelerator, stage.folder, stage.fingerprint, *sets["forget"], *sets["retain"], num_classes=k)
            method = method_cls(ctx)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.time()
            model = method.run(model)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rte = (time.time() - start) / 60
            save_model(model, stage.folder / "model.safetensors")
            stage.finish({"method": name, "rte_minutes": rte, "resumed": resumed, "metrics": evaluate(model), **method.info})
        done = read_json(stage.folder / "done.json")
        rows[name] = {**done["metrics"], "RTE": done["rte_minutes"]}
        log(f"[{name}] " + "  ".join(f"{m} {v:.2f}" for m, v in rows[name].items()))

    table = make_table(rows)
    report = {"workdir": str(workdir), "forget": to_dict(config.forget), "sizes": sizes, "table": table}
    write_json(workdir / "results.json", report)
    write_text(workdir / "results.md", markdown(table))
    return table
