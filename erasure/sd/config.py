"""The schema of a Stable Diffusion erasure run, and of concept specs.

A run config (``configs/sd/*.yaml``) names the model, the concept spec, the method and
its hyper-parameters. A concept spec (``configs/sd/concepts/*.yaml``) says what to forget,
what to steer it to and what to keep, as prompts (files in ``prompts/``) or image folders.
A spec may also be a *class set* (e.g. Imagenette): ``classes`` and a ``template``; the
run then picks ``concept.forget``, the target is the next class and the others are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from erasure.core.config import load_config
from erasure.core.errors import ErasureError


@dataclass
class SDModelConfig:
    """Which pipeline, and in what precision its frozen parts run."""

    pretrained: str = "CompVis/stable-diffusion-v1-4"  # hub id or local diffusers folder
    revision: str | None = None
    frozen_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # VAE, text encoder, ESD teacher; auto = bf16 on GPU
    safety_checker: Literal[False] = False  # always off: the tool measures what the model generates


@dataclass
class ConceptConfig:
    """Which concept spec, and for class sets which class to forget."""

    spec: str = "configs/sd/concepts/nudity.yaml"
    forget: str | None = None  # class name, for class-set specs


@dataclass
class GenerationConfig:
    """How the forget / target / retain training images are generated with the base model."""

    images_per_set: int = 800
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    batch_size: int = 4
    seed: int = 0
    resolution: int | None = None  # None: the model's native size (512 for SD 1.x)


@dataclass
class SDMaskConfig:
    """The SalUn mask over the UNet: saliency of -MSE against the guided prediction."""

    ratio: float = 0.5
    per_layer: bool = False
    batches: int = 100  # one pass over 800 forget images at batch 8
    batch_size: int = 8
    guidance: float = 7.5
    path: str | None = None  # reuse a saved mask


@dataclass
class SDTrainConfig:
    """Fine-tuning the UNet (every method uses the same loop)."""

    steps: int = 100
    batch_size: int = 8  # per process; SalUn draws this many forget and this many retain latents
    lr: float = 1e-5
    alpha: float = 0.1  # SalUn: weight of the retain loss
    grad_clip: float | None = 1.0
    weight_decay: float = 0.0
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"  # auto: on only where the step would not fit in GPU memory
    compile: bool = False  # torch.compile the UNet (about 2 min to compile the SD v1.4 UNet on an H100)
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0


@dataclass
class ESDConfig:
    """ESD: negative guidance from a frozen copy, on latents from the model's own DDIM trajectory."""

    eta: float = 1.0  # negative-guidance strength
    ddim_steps: int = 50
    start_guidance: float = 3.0  # guidance of the trajectory that produces x_t


@dataclass
class FMNConfig:
    """Forget-Me-Not: shrink the cross-attention paid to the concept's tokens."""

    include_end_token: bool = True


@dataclass
class ExportConfig:
    """What an erasure run writes besides its checkpoints."""

    pipeline: bool = True  # a full diffusers folder, loadable with StableDiffusionPipeline.from_pretrained
    delta: bool = True  # only the changed entries, applied onto the base model with `erasure sd apply-delta`


@dataclass
class SDConfig:
    """One Stable Diffusion erasure experiment."""

    workdir: str = "runs/sd"
    device: str = "auto"
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # bf16 autocast; fp16 would need loss scaling
    method: str = "salun"
    model: SDModelConfig = field(default_factory=SDModelConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    mask: SDMaskConfig = field(default_factory=SDMaskConfig)
    train: SDTrainConfig = field(default_factory=SDTrainConfig)
    esd: ESDConfig = field(default_factory=ESDConfig)
    fmn: FMNConfig = field(default_factory=FMNConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        """Checks that span keys."""
        if not 0.0 < self.mask.ratio <= 1.0:
            raise ErasureError("mask.ratio must lie in (0, 1].")


# ----------------------------------------------------------------------------- concepts


@dataclass
class ImageSet:
    """Prompts (inline or a file, one per line) and optionally a folder of real images for them."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None  # relative to the spec file
    images: str | None = None  # a folder of images; None: generate them with the base model


@dataclass
class ConceptSpec:
    """What to forget, what to steer it towards, and what to keep."""

    name: str = ""
    concept: str = ""  # the prompt ESD erases (e.g. "nudity"); default: name
    words: str = ""  # the words of the forget prompts whose attention FMN removes (e.g. "nude"); default: concept
    forget: ImageSet = field(default_factory=ImageSet)
    target: ImageSet = field(default_factory=ImageSet)  # the misaligned target (SalUn)
    retain: ImageSet = field(default_factory=ImageSet)
    classes: list[str] = field(default_factory=list)  # a class set: forget one, target the next, keep the rest
    template: str = "an image of a {}"


@dataclass
class Concept:
    """A resolved concept: the prompt lists and image folders one run uses."""

    name: str
    concept: str
    words: str
    forget: list[str]
    target: list[str]
    retain: list[str]
    images: dict[str, str | None]  # set name -> folder of real images, or None


def _prompts(s: ImageSet, base: Path, where: str) -> list[str]:
    prompts = list(s.prompts)
    if s.prompts_file:
        path = (base / s.prompts_file) if not Path(s.prompts_file).is_absolute() else Path(s.prompts_file)
        if not path.is_file():
            raise ErasureError(f"{where}.prompts_file '{path}' does not exist.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return prompts


def load_concept(config: ConceptConfig) -> Concept:
    """Read a concept spec and resolve it (for class sets, around ``config.forget``)."""
    spec_path = Path(config.spec)
    spec = load_config(spec_path, schema=ConceptSpec)
    base = spec_path.parent
    if spec.classes:
        if config.forget not in spec.classes:
            raise ErasureError(
                f"concept.forget is {config.forget!r}, which is not a class of '{spec_path}'; choose one of: {', '.join(spec.classes)}."
            )
        i = spec.classes.index(config.forget)
        others = [c for c in spec.classes if c != config.forget]
        return Concept(
            name=config.forget.replace(" ", "_"),
            concept=config.forget,
            words=config.forget,
            forget=[spec.template.format(config.forget)],
            target=[spec.template.format(spec.classes[(i + 1) % len(spec.classes)])],
            retain=[spec.template.format(c) for c in others],
            images={"forget": None, "target": None, "retain": None},
        )
    if config.forget is not None:
        raise ErasureError(f"'{spec_path}' is not a class set, so concept.forget must be left unset.")
    sets = {name: getattr(spec, name) for name in ("forget", "target", "retain")}
    prompts = {name: _prompts(s, base, f"{spec_path}: {name}") for name, s in sets.items()}
    for name in ("forget", "target"):
        if not prompts[name]:
            raise ErasureError(f"the concept spec '{spec_path}' has no {name} prompts; add {name}.prompts or {name}.prompts_file.")
    if not prompts["retain"]:
        prompts["retain"] = prompts["target"]  # the reference nudity recipe keeps the clothed-person set
    concept = spec.concept or spec.name or spec_path.stem
    return Concept(
        name=spec.name or spec_path.stem,
        concept=concept,
        words=spec.words or concept,
        forget=prompts["forget"],
        target=prompts["target"],
        retain=prompts["retain"],
        images={name: s.images for name, s in sets.items()},
    )
