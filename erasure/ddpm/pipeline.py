"""The stages of an experiment, each reusing its output when already finished:

1. :func:`train_base` - the class-conditional DDPM          -> ``{workdir}/ddpm/model``
2. :func:`train_judge` - the classifier that scores samples -> ``{workdir}/classifier``
3. :func:`erase` - one erasure method on one class          -> ``{workdir}/erase/{method}-forget{c}``

Evaluation lives in :mod:`erasure.ddpm.evaluate`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from erasure.core.card import command_line, write_cards
from erasure.core.data import EpochSampler, load_data, random_flip, to_model_range
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, save_tensors
from erasure.core.loop import LoopSettings, make_accelerator, process_state, stage_precision, train
from erasure.core.saliency import Mask
from erasure.core.stages import Stage, config_fingerprint, is_main_process, shared_mask
from erasure.ddpm.config import Config
from erasure.ddpm.judge import Judge, train_classifier
from erasure.ddpm.methods import EraseContext, get_method
from erasure.ddpm.model import build_unet, denoising_loss, load_scheduler, load_unet, noise_scheduler, null_class, save_model


def run_info(seed: int) -> dict[str, int]:
    """What a rerun needs to reproduce a stage bit for bit on the CPU: the seed and the thread count."""
    return {"seed": seed, "threads": torch.get_num_threads()}


def base_stage(config: Config) -> Stage:
    """Where the base DDPM of ``config`` lives."""
    return Stage(Path(config.workdir) / "ddpm", config_fingerprint(config, ("data", "model", "train"), precision=stage_precision(config)))


def judge_stage(config: Config) -> Stage:
    """Where the classifier of ``config`` lives."""
    # The judge does its own augmentation: the DDPM's data.random_flip is not one of its inputs.
    return Stage(Path(config.workdir) / "classifier", config_fingerprint(config, ("data", "classifier"), skip=("data.random_flip",)))


def erase_stage(config: Config, method: str) -> Stage:
    """Where erasing ``config.unlearn.forget_class`` with ``method`` lives."""
    folder = Path(config.workdir) / "erase" / f"{method}-forget{config.unlearn.forget_class}"
    # The method is in the folder name; unlearn.method (the default for `erase`) must not change the fingerprint.
    # Sampling settings are left out: erasure does not read them, so evaluating under another
    # sampling protocol (sample.protocol=reference) reuses the finished erasures.
    config = dataclasses.replace(config, unlearn=dataclasses.replace(config.unlearn, method=method))
    return Stage(folder, config_fingerprint(config, ("data", "model", "train", "unlearn"), precision=stage_precision(config)))


RAW_WEIGHTS = "raw_weights.safetensors"  # beside the base's model/ folder (which holds its EMA weights)


def finished_base(config: Config) -> Path:
    """The folder of the finished base DDPM, or a clear error saying how to make it."""
    stage = base_stage(config)
    if not stage.done():
        raise ErasureError(f"no finished base model in '{stage.folder}'; run `erasure train-ddpm` with this config first.")
    if config.unlearn.start_weights == "raw" and not (stage.folder / RAW_WEIGHTS).is_file():
        raise ErasureError(
            f"the base model in '{stage.folder}' has no raw (non-EMA) weights, which erasure starts from by default; "
            "it was trained by an older version. Retrain it (delete the folder), or erase from its EMA weights "
            "with unlearn.start_weights=ema."
        )
    return stage.folder / "model"


def train_base(config: Config) -> Path:
    """Train (or reuse) the class-conditional DDPM; returns its diffusers folder."""
    stage = base_stage(config)

    def work() -> dict:
        data = load_data(config.data, "train")
        accelerator = make_accelerator(config.device, config.mixed_precision, config.log_with)
        torch.manual_seed(config.train.seed)  # the initial weights: without it two identical runs start apart
        unet = build_unet(config.model, data.shape, data.num_classes)
        scheduler = noise_scheduler(config.model.num_train_timesteps)
        images, labels = data.images.to(accelerator.device), data.labels.to(accelerator.device)
        null, cfg = null_class(unet), config.train
        sampler = None
        if cfg.data_order == "epochs":  # each process its own order
            sampler = EpochSampler(len(labels), cfg.batch_size, cfg.seed * 1_009 + accelerator.process_index, accelerator.device)

        def step_loss(model: torch.nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict[str, float]]:
            if sampler is not None:
                idx = sampler(step)
            else:
                idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=g, device=g.device)
            drop = torch.rand(len(idx), generator=g, device=g.device) < cfg.class_dropout
            c = torch.where(drop, null, labels[idx])
            x0 = to_model_range(images[idx])
            if config.data.random_flip:
                x0 = random_flip(x0, g)
            return denoising_loss(model, scheduler, x0, c, g, cfg.timesteps == "antithetic", cfg.loss_reduction), {}

        settings = LoopSettings.from_config(cfg, cosine=cfg.schedule == "cosine", desc="base DDPM")
        unet, ema = train(unet, step_loss, settings, stage.folder, accelerator, fingerprint=stage.fingerprint)
        if accelerator.is_main_process:
            # The raw weights are where the reference's erasure starts (unlearn.start_weights=raw);
            # the EMA weights are what the base model samples with.
            save_tensors(stage.folder / RAW_WEIGHTS, unet.state_dict())
            ema.copy_to([p for p in unet.parameters() if p.requires_grad])
            save_model(unet, scheduler, stage.folder / "model")
        return {"steps": cfg.steps, "parameters": sum(p.numel() for p in unet.parameters()), **run_info(cfg.seed)}

    stage.run(config, work)
    return stage.folder / "model"


def train_judge(config: Config) -> Path:
    """Train (or reuse) the classifier on the train split; records its test accuracy."""
    stage = judge_stage(config)

    def work() -> dict:
        data = load_data(config.data, "train")
        model = train_classifier(config.classifier, data, stage.folder, config.device, stage.fingerprint, config.log_with)
        test = load_data(config.data, "test")
        accuracy = (model.predict(test.images) == test.labels).float().mean().item()
        model.save(stage.folder)
        return {"test_accuracy": accuracy, **run_info(config.classifier.seed)}

    stage.run(config, work)
    return stage.folder


def start_weights(config: Config, base: Path, device: str | torch.device) -> torch.nn.Module:
    """The base UNet with the weights erasure starts from (``unlearn.start_weights``: raw or EMA)."""
    unet = load_unet(base, device)
    if config.unlearn.start_weights == "raw":
        unet.load_state_dict(load_tensors(base.parent / RAW_WEIGHTS, device))
    return unet


def erase(config: Config, method: str | None = None) -> Path:
    """Erase ``config.unlearn.forget_class`` from the base DDPM; returns the erased model's folder."""
    method = method or config.unlearn.method
    method_cls = get_method(method)
    stage = erase_stage(config, method)
    if stage.done():
        return stage.folder / "model"
    base = finished_base(config)

    def work() -> dict:
        accelerator = make_accelerator(config.device, config.mixed_precision, config.log_with)
        unet = start_weights(config, base, accelerator.device)
        ctx = erase_context(config, unet, load_scheduler(base), accelerator.device, accelerator.process_index)
        m = method_cls(ctx)
        mask = shared_mask(stage, accelerator, unet, lambda: m.make_mask(unet))
        m.prepare(unet)
        settings = LoopSettings.from_config(config.unlearn, desc=f"erase {method}")

        def step_loss(model: torch.nn.Module, g: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
            ctx.step = step  # under unlearn.data_order=epochs the step picks the batches
            return m.loss(model, g)

        unet, _ = train(unet, step_loss, settings, stage.folder, accelerator, mask, stage.fingerprint)
        if accelerator.is_main_process:
            save_model(unet, ctx.scheduler, stage.folder / "model")
        summary = {"method": method, "forget_class": config.unlearn.forget_class, "target_class": ctx.target_class}
        summary.update(run_info(config.unlearn.seed))
        summary["command"] = command_line()
        if mask is not None:
            summary["mask_kept_fraction"] = mask.kept_fraction
        return summary

    stage.run(config, work)
    if is_main_process():
        write_cards(stage.folder)  # after done.json exists
    return stage.folder / "model"


def erase_context(config: Config, unet: UNet2DModel, scheduler: DDPMScheduler, device: torch.device, rank: int = 0) -> EraseContext:
    """The data and settings an erasure method sees (``rank``: this process's index in a multi-GPU job)."""
    cfg = config.unlearn
    data = load_data(config.data, "train")
    k = data.num_classes
    if not 0 <= cfg.forget_class < k:
        raise ErasureError(f"unlearn.forget_class={cfg.forget_class} is not a class of {config.data.name} (0..{k - 1}).")
    forget = data.labels == cfg.forget_class
    return EraseContext(
        config=cfg,
        sample=config.sample,
        scheduler=scheduler,
        forget_images=to_model_range(data.images[forget]).to(device),
        retain_images=to_model_range(data.images[~forget]).to(device),
        retain_labels=data.labels[~forget].to(device),
        forget_class=cfg.forget_class,
        target_class=(cfg.forget_class + cfg.target_shift) % k,
        null_class=null_class(unet),
        random_flip=config.data.random_flip,
        rank=rank,
    )


def compute_mask(config: Config, out: str | Path) -> Mask:
    """Compute SalUn's saliency mask for ``config.unlearn.forget_class`` and save it to ``out``."""
    from erasure.ddpm.methods.salun import SalUn

    base = finished_base(config)
    device = resolve_device(config.device)
    unet = start_weights(config, base, device)
    mask = SalUn(erase_context(config, unet, load_scheduler(base), device)).make_mask(unet)
    mask.save(out)
    return mask


def resolve_device(device: str) -> torch.device:
    """'auto' is this process's GPU when there is one (under ``accelerate launch``, each process its own), else the CPU."""
    if device == "auto":
        return process_state().device
    return torch.device(device)


def load_judge(config: Config, device: str | torch.device = "cpu") -> Judge:
    """The finished classifier of ``config``."""
    stage = judge_stage(config)
    if not stage.done():
        raise ErasureError(f"no finished classifier in '{stage.folder}'; run `erasure train-classifier` with this config first.")
    return Judge.load(stage.folder, device)
