"""A Stable Diffusion erasure run, from config to exported model:

1. :func:`training_sets` - the forget / retain images (generated with the base model unless
   the concept spec points at real ones) as cached VAE latents  -> ``{workdir}/data/{set}``
2. :func:`erase` - the method's mask (SalUn), the shared training loop, and the export:
   a diffusers pipeline folder and a compact delta              -> ``{workdir}/{method}``

Every step is resumable and runs unchanged under ``accelerate launch`` on N processes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from erasure.core.card import command_line, write_cards
from erasure.core.delta import make_delta
from erasure.core.errors import ErasureError
from erasure.core.io import load_tensors, save_tensors
from erasure.core.loop import LoopSettings, make_accelerator, train
from erasure.core.stages import Stage, config_fingerprint, is_main_process, shared_mask
from erasure.sd.config import Concept, SDConfig, SDTrainConfig, load_concept
from erasure.sd.generate import Item, generate
from erasure.sd.methods import SD_METHODS, SDContext
from erasure.sd.methods.base import LatentSet, steps_per_epoch
from erasure.sd.model import (
    encode_conditioning,
    encode_posterior,
    frozen_dtype,
    load_pipeline,
    load_unet,
    native_size,
    noise_scheduler,
    save_pipeline,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def resolution(config: SDConfig, pipe: DiffusionPipeline) -> int:
    """Training image size: configured, or the model's native one (512 for SD 1.x, 1024 for SDXL)."""
    return config.generation.resolution or native_size(pipe)


def load_image_folder(folder: str | Path, size: int) -> torch.Tensor:
    """Every image in ``folder`` (sorted by name), center-cropped and resized, as uint8 ``[N, 3, size, size]``."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if Path(folder).is_dir() else []
    if not files:
        raise ErasureError(f"no images (png, jpg, webp, bmp) in '{folder}'; check the concept spec's images path.")
    out = []
    for path in files:
        try:
            image = Image.open(path).convert("RGB")
        except OSError as e:
            raise ErasureError(f"cannot read the image '{path}': {e}") from None
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(out)


def training_sets(
    config: SDConfig, concept: Concept, pipe: DiffusionPipeline, names: tuple[str, ...], device: torch.device
) -> dict[str, LatentSet]:
    """The image sets ``names`` as latents with their prompts' conditioning; images are made or read once and cached."""
    size = resolution(config, pipe)
    out = {}
    for name in names:
        prompts: list[str] = getattr(concept, name)
        real = concept.images[name]
        # The images are made with the pipeline's own UNet and encoded by its VAE: the trained UNet's variant is not theirs.
        fingerprint = config_fingerprint(config, ("model", "generation"), skip={"model.unet_variant"}, prompts=prompts, real=real)
        stage = Stage(Path(config.workdir) / "data" / name, fingerprint)
        stage.run(config, functools.partial(_make_set, config, pipe, stage.folder, name, prompts, real, size))
        cached = load_tensors(stage.folder / "latents.safetensors")  # on the CPU: only what training reads moves to the device
        std = None
        if config.train.latents == "sample":
            if "std" not in cached:
                raise ErasureError(
                    f"the latents cached in {stage.folder} hold only the VAE posterior's mean (an earlier version), and "
                    "train.latents=sample draws from the whole posterior: delete "
                    f"{stage.folder / 'done.json'} to encode the images kept there again, or set train.latents=mean"
                )
            std = cached["std"].to(device)
        embeddings = encode_conditioning(pipe, prompts, size).float().to(device)
        out[name] = LatentSet(cached["latents"].to(device), cached["prompt_index"].long().to(device), embeddings, prompts, std)
    return out


def _make_set(
    config: SDConfig, pipe: DiffusionPipeline, folder: Path, name: str, prompts: list[str], real: str | list[str] | None, size: int
) -> dict:
    """Generate (on every process) a set's images unless real ones are given, then encode them (main process)."""
    gen = config.generation
    if not real:
        # Image i uses prompt i mod P and its own seed, so sets are reproducible and extendable.
        items = [
            Item(prompts[i % len(prompts)], gen.seed * 1_000_003 + i, gen.guidance, gen.steps, size, size)
            for i in range(gen.images_per_set)
        ]
        generate(pipe, items, folder / "images", config.model.pretrained, gen.scheduler, gen.batch_size, f"generating {name}", gen.compile)
    if not is_main_process():  # only the main process reads the images and encodes the latents
        return {}
    # The posterior's mean and std: training draws a fresh sample from them (train.latents).
    if isinstance(real, list):  # one folder per prompt (a class set's real images)
        parts = [[x.cpu() for x in encode_posterior(pipe, load_image_folder(f, size))] for f in real]
        latents, std = (torch.cat([part[k] for part in parts]) for k in (0, 1))
        index = torch.cat([torch.full((len(p[0]),), k) for k, p in enumerate(parts)])
    else:
        latents, std = (x.cpu() for x in encode_posterior(pipe, load_image_folder(real or folder / "images", size)))
        index = torch.arange(len(latents)) % len(prompts)
    save_tensors(folder / "latents.safetensors", {"latents": latents, "std": std, "prompt_index": index})
    return {"images": len(latents), "prompts": len(prompts), "resolution": size, "source": real or "generated"}


def method_stage(config: SDConfig, concept: Concept) -> Stage:
    """Where a method's run lives; its fingerprint covers the whole config except other methods' sections and export."""
    own = SD_METHODS.get(config.method).section
    others = {m.section for m in SD_METHODS.entries.values() if m.section and m.section != own}
    return Stage(Path(config.workdir) / config.method, config_fingerprint(config, skip={"export", *others}, concept=concept.record()))


def erase(config: SDConfig) -> Path:
    """Erase the configured concept(s) with ``config.method``; returns the run folder.

    A closed-form method (``closed_form``) edits the UNet in :meth:`~erasure.sd.methods.base.SDMethod.edit`
    instead of training it; the export (model folder, delta, ``done.json``) is the same.
    """
    method_cls = SD_METHODS.get(config.method)
    concept = load_concept(config.concept)
    stage = method_stage(config, concept)

    def work() -> dict:
        bf16_weights = config.train.weights_dtype == "bf16"  # esd_sd.py: bf16 weights need bf16 compute
        precision = "bf16" if bf16_weights else config.mixed_precision
        accelerator = make_accelerator(config.device, precision, config.log_with, method_cls.unused_weights)
        device = accelerator.device
        # Frozen parts (and data generation) run in low precision; the trained UNet is a separate copy, fp32 where it trains.
        pipe = load_pipeline(config.model.pretrained, config.model.revision, frozen_dtype(config.model.frozen_dtype, device)).to(device)
        sets = training_sets(config, concept, pipe, method_cls.needs, device)
        size = resolution(config, pipe)
        uncond = encode_conditioning(pipe, [""], size).float().to(device)
        dtype = torch.bfloat16 if bf16_weights else torch.float32
        unet = pipe.unet = load_unet(config.model.pretrained, config.model.revision, config.model.unet_variant, dtype).to(device)
        scheduler = noise_scheduler(pipe)
        processes = accelerator.process_index, accelerator.num_processes
        ctx = SDContext(config, concept, pipe, scheduler, sets, uncond, device, size, *processes, folder=stage.folder)
        method = method_cls(ctx)
        if method_cls.closed_form:
            # Every process makes the same deterministic edit; only the main one writes it.
            with torch.no_grad():
                info = method.edit(unet)
            return {**export(config, concept, unet, stage.folder), **info} if accelerator.is_main_process else {}

        for name, p in unet.named_parameters():
            p.requires_grad_(method.trainable(name))
        if not any(p.requires_grad for p in unet.parameters()):
            raise ErasureError(f"method '{config.method}' selects no trainable weights in this UNet.")
        if use_gradient_checkpointing(config.train, resolution(config, pipe), device):
            unet.enable_gradient_checkpointing()
        if device.type == "cuda":
            unet = unet.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
        mask = shared_mask(stage, accelerator, unet, lambda: method.make_mask(unet))
        method.prepare(unet)  # before the next line: an ESD teacher is copied from the fp32 weights
        if accelerator.precision == "bf16":
            hold_frozen_weights_in_bf16(unet)
        steps = training_steps(config.train, sets, accelerator.num_processes)
        settings = LoopSettings.from_config(config.train, steps=steps, desc=f"erase {config.method}")

        def step_loss(m: torch.nn.Module, g: torch.Generator, step: int) -> tuple:
            method.step = step  # methods that read their data in order (SalUn, train.data_order=epochs) need it
            return method.loss(m, g)

        unet, _ = train(unet, step_loss, settings, stage.folder, accelerator, mask, stage.fingerprint)
        if not accelerator.is_main_process:
            return {}
        summary = export(config, concept, unet, stage.folder)
        if mask is not None:
            summary["mask_kept_fraction"] = mask.kept_fraction
        return summary

    stage.run(config, work)
    if is_main_process():
        write_cards(stage.folder)  # after done.json exists; refreshed with the latest results on every call
    return stage.folder


def training_steps(train: SDTrainConfig, sets: dict[str, LatentSet], processes: int = 1) -> int:
    """``train.steps``, or with ``train.epochs`` set, that many passes over the forget set (the reference's ``--epochs``)."""
    if train.epochs is None:
        return train.steps
    return train.epochs * steps_per_epoch(len(sets["forget"]), train.batch_size, processes)


def use_gradient_checkpointing(train: SDTrainConfig, size: int, device: torch.device) -> bool:
    """``train.gradient_checkpointing``: on, off, or auto (on only where the step would not fit in free GPU memory).

    Checkpointing trades about a third more compute for activations; an H100 holds the
    SD v1.4 SalUn step (batch 8, 512 px, bf16) in 30.5 GiB without it. auto scales that
    measurement by batch size and pixel count and keeps a 15% margin.
    """
    if train.gradient_checkpointing != "auto":
        return train.gradient_checkpointing == "on"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    need = 30.5 * 2**30 * train.batch_size / 8 * (size / 512) ** 2 * 1.15
    return free < need


def hold_frozen_weights_in_bf16(unet: torch.nn.Module) -> None:
    """Store the frozen Linear and Conv2d weights of the UNet being trained in bf16, for training under bf16 autocast.

    Autocast computes these layers in bf16 and would cast their fp32 weights at every call:
    the values are the same either way, rounded once instead of per call. A method that trains
    a small part (ESD-x: cross-attention only) thus keeps no fp32 copy of weights it never
    changes (about 3 GB of the SD v1.4 UNet's 3.4) and re-casts none of them at each of the
    ~25 UNet calls of its trajectory. Norm layers keep fp32 (autocast runs them in fp32), and
    the export takes every frozen weight from the base model, exactly.
    """
    for module in unet.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)


def export(config: SDConfig, concept: Concept, unet: torch.nn.Module, folder: Path) -> dict:
    """Write the erased pipeline (full precision, base components) and/or the delta against the base UNet.

    Only the trained tensors come from ``unet``; the frozen ones are the base's (training may
    have held them in bf16, see :func:`hold_frozen_weights_in_bf16`).
    """
    base = load_pipeline(config.model.pretrained, config.model.revision)
    if config.model.unet_variant:  # the weights training started from
        base.unet = load_unet(config.model.pretrained, config.model.revision, config.model.unet_variant)
    trained = {name for name, p in unet.named_parameters() if p.requires_grad}
    unet = unet.cpu().float().requires_grad_(False)
    unet.load_state_dict({k: v for k, v in base.unet.state_dict().items() if k not in trained}, strict=False)
    unet.disable_gradient_checkpointing()
    concepts = [part.name for part in concept.concepts]
    summary: dict = {"method": config.method, "concept": concept.name, "concepts": concepts, "base_model": config.model.pretrained}
    summary["command"] = command_line()
    if config.export.delta:
        info = {"base_model": config.model.pretrained, "method": config.method, "concept": concept.name, "concepts": concepts}
        if config.model.unet_variant:
            info["unet_variant"] = config.model.unet_variant  # apply-delta loads the same base UNet
        summary["delta"] = make_delta(base.unet.state_dict(), unet.state_dict(), folder / "delta.safetensors", **info)
    if config.export.pipeline:
        base.unet = unet
        save_pipeline(base, folder / "model")
    return summary
