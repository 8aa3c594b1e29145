"""The whole table from one config: split, original model, each method, metrics, report.

Layout of ``{workdir}``:

    split.safetensors     train / val / forget / retain / test indices (seeded)
    original/             the model trained on its own train split (model.safetensors, log.csv, done.json)
    {method}/             one per method: model.safetensors (+ mask.safetensors for salun), done.json
    results.json results.md
    sweep/{point}/{method}/   a sweep's runs (see :mod:`erasure.classification.sweep`), with sweep.json sweep.md

Every folder is a :class:`erasure.core.stages.Stage`: a finished one with the same settings is
reused, an interrupted one resumes from its checkpoint, and one finished with other
settings is an error rather than an overwrite.

Under ``accelerate launch`` every process trains (each on its shard of every batch, see
:mod:`erasure.classification.train`); the main process alone writes files, scores the
models and logs, while the others wait for it at each stage's end.
"""

from __future__ import annotations

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
from erasure.core.errors import ErasureError
from erasure.core.io import read_json, write_json, write_text
from erasure.core.loop import make_accelerator, stage_precision
from erasure.core.stages import Stage, config_fingerprint, on_main_process, wait_for_everyone

# How a finished stage's metrics were taken; a stage recorded before a key existed used these.
EARLIER_EVAL = {"eval_precision": "autocast", "mia_members": "random"}


def eval_settings(config: ClassificationConfig) -> dict[str, str]:
    """The settings that score a model (not part of any stage's fingerprint: changing one re-scores, never retrains)."""
    return {"eval_precision": config.eval_precision, "mia_members": config.mia_members}


def selected(stage: Stage) -> dict[str, Any]:
    """For ``done.json``: the epoch a run kept and its validation accuracy, where it kept its best (select: best_val)."""
    path = stage.folder / "selection.json"
    if not path.is_file():
        return {}
    chosen = read_json(path)
    return {"selected": {"epoch": chosen["epoch"], "val_accuracy": chosen["val_accuracy"]}}


def original_stage(config: ClassificationConfig) -> Stage:
    """The model trained on its train split (``split.original``; the forget set does not matter to it)."""
    return Stage(
        Path(config.workdir) / "original",
        config_fingerprint(config, ("data", "split", "model", "train"), precision=stage_precision(config)),
    )


def method_stage(config: ClassificationConfig, method: str, root: str | Path | None = None) -> Stage:
    """One method's folder (under ``root``, default the workdir).

    Its fingerprint covers what the method reads: the data, split, forget set and model, and
    of ``unlearn`` the settings every method shares plus only its own section.
    """
    folder = Path(root if root is not None else config.workdir) / method
    if method == "retrain":
        return Stage(folder, config_fingerprint(config, ("data", "split", "forget", "model", "retrain"), precision=stage_precision(config)))
    u = to_dict(config.unlearn)
    shared = {k: v for k, v in u.items() if k != "methods" and not isinstance(v, dict)}
    own = {"method": method, "shared": shared, "settings": u.get(method)}
    return Stage(
        folder, config_fingerprint(config, ("data", "split", "forget", "model", "train"), unlearn=own, precision=stage_precision(config))
    )


def load_split(config: ClassificationConfig, train_labels: torch.Tensor, test_labels: torch.Tensor) -> Split:
    """The run's split: made once (seeded) and saved by the main process, then read back (by every process, on every rerun)."""
    path = Path(config.workdir) / "split.safetensors"
    fp = fingerprint(config.data, config.split, config.forget)

    def make() -> None:
        if not path.is_file():
            make_split(train_labels, test_labels, config.split, config.forget).save(path, fp)

    # Every process takes part (the file check is the main process's alone): one that saw the
    # file appear would otherwise skip the collective the others wait in.
    on_main_process(make)
    return Split.load(path, fp)


class Experiment:
    """The data, split and original model of a config, ready to run and score methods against.

    Building it loads the data onto the device and trains (or reuses) the original model;
    :meth:`run_method` then runs (or reuses) one method. A sweep builds one experiment and
    runs every grid point against it, so the original model and Retrain are made once.
    """

    def __init__(self, config: ClassificationConfig, log: Callable[[str], None] = print) -> None:
        self.accelerator = make_accelerator(config.device, config.mixed_precision, config.log_with)
        self.config, self.log = config, log if self.accelerator.is_main_process else _quiet
        dev = self.accelerator.device
        train_data, test_data = load_data(config.data, "train"), load_data(config.data, "test")
        split = load_split(config, train_data.labels, test_data.labels)
        sets = {
            "forget": (train_data.images[split.forget], train_data.labels[split.forget]),
            "retain": (train_data.images[split.retain], train_data.labels[split.retain]),
            "test": (test_data.images[split.test], test_data.labels[split.test]),
            "test_forget": (test_data.images[split.test_forget], test_data.labels[split.test_forget]),
        }
        self.sets = {k: (x.to(dev), y.to(dev)) for k, (x, y) in sets.items()}
        # Scored after every epoch where a recipe keeps its best epoch (select: best_val); never a metric.
        self.val = (train_data.images[split.val].to(dev), train_data.labels[split.val].to(dev))
        self.in_channels, self.num_classes = train_data.shape[0], train_data.num_classes
        self.sizes = {name: len(getattr(split, name)) for name in ("train", "val", "forget", "retain", "test", "test_forget")}
        # split.original: own -> part of the forget set was never trained on by the original model (as in the reference).
        self.sizes["forget_unseen_by_original"] = int((~torch.isin(split.forget, split.original_train)).sum())
        log(f"{config.data.name}: " + ", ".join(f"{name} {n}" for name, n in self.sizes.items()))

        stage = original_stage(config)

        def train_original() -> dict:
            source = {}
            if config.original_from is not None:
                source = reusable_original(config.original_from, stage.fingerprint)
                log(f"[original] reusing {source['folder']} -> {stage.folder}")
                model = load_weights(self.fresh_model(config.train.seed), Path(source["folder"]) / "model.safetensors").to(dev)
                minutes = source["train_minutes"]
            else:
                log(f"[original] training -> {stage.folder}")
                start = time.time()
                model = self.fresh_model(config.train.seed).to(dev)
                images, labels = train_data.images[split.original_train].to(dev), train_data.labels[split.original_train].to(dev)
                val = train_data.images[split.original_val].to(dev), train_data.labels[split.original_val].to(dev)
                fp, sync_bn = stage.fingerprint, config.sync_batchnorm
                model = fit(
                    model, images, labels, config.train, stage.folder, self.accelerator, fp, desc="original", sync_bn=sync_bn, val=val
                )
                minutes = (time.time() - start) / 60
            if not self.accelerator.is_main_process:
                return {}  # only the main process's summary is written
            save_model(model, stage.folder / "model.safetensors")
            # Scored here, on this config's sets: UA and MIA depend on the forget set.
            summary = {"train_minutes": minutes, "metrics": self.evaluate(model), **eval_settings(config), **selected(stage)}
            return {**summary, "reused_from": source["folder"]} if source else summary

        stage.run(config, train_original)
        self.original = stage.folder / "model.safetensors"
        self.original_metrics = self._metrics(stage)

    def fresh_model(self, seed: int) -> torch.nn.Module:
        """A newly initialized network of the config's architecture (seeded)."""
        return build_model(self.config, self.in_channels, self.num_classes, seed)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """UA, RA, TA, MIA of ``model`` on this experiment's sets."""
        c = self.config
        autocast = c.eval_precision == "autocast"
        return score(model, self.sets, c.eval_batch_size, self.accelerator, c.split.seed, autocast, c.mia_members)

    def _metrics(self, stage: Stage) -> dict[str, float]:
        """A finished stage's metrics; re-scored from its saved model if they were taken with other eval settings."""
        done = read_json(stage.folder / "done.json")
        if any(done.get(key, EARLIER_EVAL[key]) != value for key, value in eval_settings(self.config).items()):
            wait_for_everyone()  # every process has read the old record, so all take this branch, before it is rewritten

            def rescore() -> None:
                model = load_weights(self.fresh_model(0), stage.folder / "model.safetensors").to(self.accelerator.device)
                done.update(metrics=self.evaluate(model), **eval_settings(self.config))
                write_json(stage.folder / "done.json", done)

            on_main_process(rescore)
            done = read_json(stage.folder / "done.json")
        return done["metrics"]

    def run_method(self, config: ClassificationConfig, name: str, root: str | Path | None = None) -> dict[str, float]:
        """Run (or reuse) method ``name`` with ``config``'s settings in ``root/name``; its metrics and RTE."""
        dev = self.accelerator.device
        stage = method_stage(config, name, root)
        label = name if root is None else f"{Path(root).name}/{name}"

        def unlearn() -> dict:
            self.log(f"[{label}] unlearning -> {stage.folder}")
            resumed = (stage.checkpoint / "state.json").is_file()
            model = load_weights(self.fresh_model(config.train.seed), self.original).to(dev)
            forget, retain = self.sets["forget"], self.sets["retain"]
            ctx = UnlearnContext(config, self.accelerator, stage.folder, stage.fingerprint, *forget, *retain, self.num_classes, *self.val)
            method = get_method(name)(ctx)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.time()
            model = method.run(model)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rte = (time.time() - start) / 60
            if not self.accelerator.is_main_process:
                return {}  # only the main process's summary is written
            save_model(model, stage.folder / "model.safetensors")
            summary = {"method": name, "rte_minutes": rte, "resumed": resumed, "metrics": self.evaluate(model), **method.info}
            return {**summary, **eval_settings(config), **selected(stage)}

        stage.run(config, unlearn)
        row = {**self._metrics(stage), "RTE": read_json(stage.folder / "done.json")["rte_minutes"]}
        self.log(f"[{label}] " + "  ".join(f"{m} {v:.2f}" for m, v in row.items()))
        return row


def reusable_original(path: str | Path, fingerprint: str) -> dict[str, Any]:
    """The finished original model at ``path`` (a workdir or its ``original/`` folder), checked to match ``fingerprint``.

    Returns its folder and training minutes. Training settings that differ would make the
    table's original model (and every method started from it) another experiment's, so they
    are an error, not a warning.
    """
    folder = Path(path)
    if (folder / "original" / "done.json").is_file():
        folder = folder / "original"
    done_file = folder / "done.json"
    if not done_file.is_file() or not (folder / "model.safetensors").is_file():
        raise ErasureError(
            f"original_from='{path}' holds no finished original model (no done.json and model.safetensors in it or in its "
            "original/ folder). Point it at the workdir of a finished table, or drop original_from to train one."
        )
    done = read_json(done_file)
    if done.get("fingerprint") != fingerprint:
        raise ErasureError(
            f"the original model in '{folder}' was trained with other data, split, model or train settings "
            f"(fingerprint {done.get('fingerprint')}, this config's {fingerprint}); only the forget set and the "
            "unlearning settings may differ. Use the config that trained it, or drop original_from to train one."
        )
    return {"folder": str(folder), "train_minutes": done.get("train_minutes")}


def run_table(
    config: ClassificationConfig, log: Callable[[str], None] = print, experiment: Experiment | None = None
) -> list[dict[str, Any]]:
    """Train (or reuse) the original model and every method in ``config.unlearn.methods``; return the table.

    ``experiment``: one already built for ``config`` (its data on the device), to share with a sweep.
    """
    workdir = Path(config.workdir)
    experiment = experiment if experiment is not None else Experiment(config, log)
    rows: dict[str, dict[str, float]] = {"original": experiment.original_metrics}
    for name in config.unlearn.methods:
        rows[name] = experiment.run_method(config, name)
    table = make_table(rows)
    report = {"workdir": str(workdir), "forget": to_dict(config.forget), "sizes": experiment.sizes, "table": table}

    def write() -> None:
        write_json(workdir / "results.json", report)
        write_text(workdir / "results.md", markdown(table))

    on_main_process(write)  # the files exist once any process returns
    return table


def _quiet(message: str) -> None:
    """The log of a process other than the main one: the main process speaks for the job."""
