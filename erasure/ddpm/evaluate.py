"""Score the original model and each erased one on the same seeds.

For every model: generate ``eval.samples_per_class`` images per class, classify them,
and compute UA on the forgotten class, accuracy on the retained classes and the FID of
the retained classes against real images. Samples are cached per model in
``{workdir}/eval/samples`` so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from erasure.core.card import write_cards
from erasure.core.config import fingerprint
from erasure.core.data import ImageData, load_data, to_uint8
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, read_json, read_metadata, save_tensors
from erasure.core.loop import process_state
from erasure.core.stages import wait_for_everyone
from erasure.ddpm.config import Config
from erasure.ddpm.model import load_scheduler, load_unet, sample, sampling_record
from erasure.ddpm.pipeline import erase_stage, finished_base, judge_stage, load_judge, resolve_device
from erasure.evaluation.grid import comparison_grid
from erasure.evaluation.metrics.accuracy import per_class_accuracy, unlearning_scores
from erasure.evaluation.metrics.fid import fid
from erasure.evaluation.report import write_report


def model_folders(config: Config, methods: list[str]) -> dict[str, Path]:
    """The original model and each finished erasure, by display name."""
    folders = {"original": finished_base(config)}
    for method in methods:
        # An erased model is judged as it was made (its own config.yaml), so evaluation needs
        # only the forget class and the method, not a repeat of every erase setting.
        stage = erase_stage(config, method)
        if not stage.finished():
            raise ErasureError(f"no finished '{method}' erasure in '{stage.folder}'; run `erasure erase --method {method}` first.")
        folders[method] = stage.folder / "model"
    return folders


def generate_cached(
    folder: Path, labels: torch.Tensor, config: Config, cache: Path, device: torch.device, desc: str = "sampling"
) -> torch.Tensor | None:
    """uint8 samples of the model in ``folder`` for ``labels``, reusing a cached set.

    Under ``accelerate launch`` every process calls this: each samples every N-th batch on
    its own device and saves it beside the cache; the main process joins them (the same
    images one process makes) and returns them, the others return None.
    """
    provenance = (folder.parent / "done.json").read_text()  # changes whenever the model is redone
    seed, size = config.eval.seed, config.eval.batch_size
    key = hashlib.sha256(f"{fingerprint(config.sample)}|{seed}|{size}|{labels.tolist()}|{provenance}".encode()).hexdigest()
    state = process_state()
    if cache.is_file() and read_metadata(cache).get("key") == key:
        return load_tensors(cache)["images"] if state.is_main_process else None
    unet = load_unet(folder, device)
    steps = load_scheduler(folder).config.num_train_timesteps
    starts = range(0, len(labels), size)
    mine = starts[state.process_index :: state.num_processes]
    bar = tqdm(mine, desc=desc, disable=not state.is_main_process or len(mine) < 2, leave=False)
    # Batch s is sampled as one call over all labels would sample it (first=s): the images do not depend on the process count.
    parts = {str(s): to_uint8(sample(unet, labels[s : s + size], config.sample, seed, steps, size, progress=False, first=s)) for s in bar}
    if state.num_processes > 1:
        if parts and not state.is_main_process:
            save_tensors(cache.with_name(f"{cache.stem}.part{state.process_index}.safetensors"), parts, {"key": key})
        wait_for_everyone()
        if not state.is_main_process:
            return None
        for rank in range(1, min(state.num_processes, len(starts))):  # the ranks that had a batch
            other = cache.with_name(f"{cache.stem}.part{rank}.safetensors")
            parts.update(load_tensors(other))
            other.unlink()
    images = torch.cat([parts[str(s)] for s in starts])
    save_tensors(cache, {"images": images}, {"key": key})
    return images


def sample_labels(k: int, forget: int, n: int, n_fid: int | None = None) -> torch.Tensor:
    """The class of each generated image, class by class: ``n`` of the forgotten class (UA) and
    ``n_fid`` (default ``n``) of each retained class (FID, retained accuracy)."""
    counts = [n if c == forget else (n_fid or n) for c in range(k)]
    return torch.arange(k).repeat_interleave(torch.tensor(counts))


def grid_column(images: torch.Tensor, labels: torch.Tensor, k: int, per_row: int) -> torch.Tensor:
    """The first ``per_row`` images of each class, (k, per_row, C, H, W)."""
    per_row = min(per_row, *(int((labels == c).sum()) for c in range(k)))
    return torch.stack([images[labels == c][:per_row] for c in range(k)])


def fid_real_images(held: ImageData, retained: list[int], config: Config) -> torch.Tensor:
    """The real images the retained-class FID compares against.

    All of the retained classes' images; with ``eval.fid.real_images_per_class`` the first N of
    each (dataset order, as the reference's ``save_base_dataset.py``); with ``eval.fid.real_images``
    a seeded random subset of that many.
    """
    per_class = config.eval.fid.real_images_per_class
    if per_class is not None:
        return torch.cat([held.images[held.labels == c][:per_class] for c in retained])
    real_retained = held.of_classes(retained).images
    cap = config.eval.fid.real_images
    if cap is not None and cap < len(real_retained):
        pick = torch.randperm(len(real_retained), generator=torch.Generator().manual_seed(config.eval.seed))[:cap]
        real_retained = real_retained[pick]
    return real_retained


def evaluate(config: Config, methods: list[str] | None = None) -> dict[str, Any]:
    """Evaluate; writes ``report.json``, ``report.md`` and ``grid.png`` into ``{workdir}/eval``.

    Under ``accelerate launch`` the processes share the sampling (each on its own GPU); the
    main process scores, writes and returns the report, the others return an empty dict.
    """
    methods = config.eval.methods if methods is None else methods
    folders = model_folders(config, methods)
    state = process_state()
    device = resolve_device(config.device)
    judge = load_judge(config, device)  # in every process: a missing classifier stops them all at once
    real = load_data(config.data, "train")
    k, n = real.num_classes, config.eval.samples_per_class
    forget = config.unlearn.forget_class
    labels = sample_labels(k, forget, n, config.eval.fid_samples_per_class)
    out = Path(config.workdir) / "eval"

    def samples(name: str) -> torch.Tensor | None:  # every process calls it for every model, in the same order
        return generate_cached(folders[name], labels, config, out / "samples" / f"{name}.safetensors", device, f"sampling {name}")

    if not state.is_main_process:  # this process samples its share of each model; the main one does the rest
        for name in folders:
            samples(name)
        wait_for_everyone()  # the main process has written the report
        return {}
    retained = [c for c in range(k) if c != forget]
    held = real if config.eval.fid_real_split == "train" else load_data(config.data, config.eval.fid_real_split)
    real_retained = fid_real_images(held, retained, config)

    models: dict[str, Any] = {}
    grid_columns: dict[str, torch.Tensor] = {}
    fid_name = ""
    record = sampling_record(config.sample)
    print(f"sampling: {record['protocol']} protocol, DDIM {record['steps']} steps, eta {record['eta']}, guidance w={record['guidance']}")
    for name in folders:
        images = samples(name)
        predicted = judge.predict(images)
        scores = unlearning_scores(predicted, labels, forget)
        keep = labels != forget
        scores["fid_retained"], fid_name = fid(images[keep], real_retained, config.eval.fid, judge, cache=out / "fid-cache")
        scores["per_class_accuracy"] = per_class_accuracy(predicted, labels, k)
        models[name] = scores
        grid_columns[name] = grid_column(images, labels, k, config.eval.grid_samples)
        ua, kept, fid_value = 100 * scores["ua"], 100 * scores["retained_accuracy"], scores["fid_retained"]
        print(f"{name}: UA {ua:.1f}%  retained acc {kept:.1f}%  FID {fid_value:.2f} ({fid_name})")

    report = {
        "dataset": config.data.name,
        "forget_class": forget,
        "forget_class_name": real.class_names[forget],
        "fid_features": fid_name,
        "classifier_test_accuracy": json.loads((judge_stage(config).folder / "done.json").read_text())["test_accuracy"],
        "protocol": {
            "judge": config.classifier.arch,  # UA and retained accuracy are comparable only under the same judge
            "samples_per_class": n,
            "fid_samples_per_class": config.eval.fid_samples_per_class or n,
            "sampling": record,
            "sampling_steps": config.sample.resolved()[0],
            "guidance": config.sample.guidance,
            "seed": config.eval.seed,
            "fid_real_images": len(real_retained),
            "fid_real_split": config.eval.fid_real_split,
            "fid_real_images_per_class": config.eval.fid.real_images_per_class,
        },
        "models": models,
    }
    # Rows accumulate: evaluating rl after salun keeps salun's row, as long as the protocol is the same.
    previous = out / "report.json"
    if previous.is_file():
        old = read_json(previous)
        if {k: v for k, v in old.items() if k not in ("models", "threads")} == {k: v for k, v in report.items() if k != "models"}:
            report["models"] = {**old["models"], **models}  # earlier rows keep their place; new ones follow
        else:
            print(f"note: {previous} was made with another protocol or forget class; its rows are replaced.")
    for name in report["models"]:
        if name not in grid_columns and (out / "samples" / f"{name}.safetensors").is_file():
            images = load_tensors(out / "samples" / f"{name}.safetensors")["images"]
            grid_columns[name] = grid_column(images, labels, k, config.eval.grid_samples)
    comparison_grid(grid_columns, real.class_names, out / "grid.png")
    write_report(out, report)
    for method in methods:  # the erased models' cards show this evaluation
        write_cards(erase_stage(config, method).folder)
    wait_for_everyone()
    return report
