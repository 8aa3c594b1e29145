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
    # Off by default: neither the SalUn SD scripts nor ESD clip gradients (FMN does: its
    # config sets 1.0). Set a norm to clip.
    grad_clip: float | None = None
    weight_decay: float = 0.0
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"  # auto: on only where the step would not fit in GPU memory
    compile: bool = False  # torch.compile the UNet (about 2 min to compile the SD v1.4 UNet on an H100)
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0


@dataclass
class ESDConfig:
    """ESD: negative guidance from a frozen copy, on latents from a DDIM trajectory.

    The defaults are the original ESD (CompVis ``train-esd.py``). The newer diffusers ESD
    (``esd_sd.py``) is ``configs/sd/nudity_esd_diffusers.yaml``: eta 2, lr 5e-5, 200
    iterations, ``params: linear``, ``trajectory: frozen``, bf16.
    """

    eta: float = 1.0  # negative-guidance strength
    ddim_steps: int = 50
    start_guidance: float = 3.0  # guidance of the trajectory that produces x_t
    # Which UNet weights esd-u and esd-all train. "compvis": the original's sets (esd-u = all
    # but attn2, the time embedding and the output norm/conv; esd-all = every weight).
    # "linear": esd_sd.py's (only Linear and Conv2d weights, so no norms; esd-u = those outside attn2).
    params: Literal["compvis", "linear"] = "compvis"
    trajectory: Literal["trained", "frozen"] = "trained"  # which model draws x_t: original ESD / esd_sd.py


@dataclass
class FMNConfig:
    """Forget-Me-Not attention re-steering (SHI-Labs ``train_attn.py``, configs/attn.yaml).

    The defaults follow the reference; each option names the deviation it allows.
    """

    # Which end-of-text positions join the concept's: "all" marks every position holding
    # the EOT token in the padded prompt (the reference's use_pooler; SD 1.x pads with EOT,
    # so this is the EOT and all padding), "first" only the EOT that ends the prompt, "none" none.
    eot_positions: Literal["all", "first", "none"] = "all"
    # "global": one L2 norm over the concatenated probabilities of every attn2 layer (the
    # reference); "per_layer": the sum of each layer's norm.
    reduction: Literal["global", "per_layer"] = "global"
    params: Literal["unet", "attn2"] = "unet"  # the reference trains the whole UNet (only_optimize_ca: false)


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
        from erasure.sd.generate import SCHEDULERS
        from erasure.sd.methods import SD_METHODS  # imported here: the methods import this module

        SD_METHODS.get(self.method)  # a misspelt method or sampler fails before any model is loaded
        if self.generation.scheduler not in SCHEDULERS:
            raise ErasureError(f"generation.scheduler is {self.generation.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}.")


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
    # Class sets only: a folder holding one image folder per class, to train on real images
    # as the reference's Imagenette runs do (None: generate them with the base model).
    # Relative paths are relative to the spec file.
    class_images: str | None = None
    class_folders: list[str] = field(default_factory=list)  # the per-class folder names (default: the class names)


@dataclass
class Concept:
    """A resolved concept: the prompt lists and image folders one run uses."""

    name: str
    concept: str
    words: str
    forget: list[str]
    target: list[str]
    retain: list[str]
    # set name -> real images: one folder, or one folder per prompt (class sets), or None (generate)
    images: dict[str, str | list[str] | None]


def _prompts(s: ImageSet, base: Path, where: str) -> list[str]:
    prompts = list(s.prompts)
    if s.prompts_file:
        path = (base / s.prompts_file) if not Path(s.prompts_file).is_absolute() else Path(s.prompts_file)
        if not path.is_file():
            raise ErasureError(f"{where}.prompts_file '{path}' does not exist.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return prompts


def _class_images(spec: ConceptSpec, base: Path, spec_path: Path, sets: dict[str, list[str]]) -> dict[str, list[str] | None]:
    """For a class set with ``class_images``: each set's folders, one per class (its prompts' order)."""
    if not spec.class_images:
        return {name: None for name in sets}
    if spec.class_folders and len(spec.class_folders) != len(spec.classes):
        raise ErasureError(f"'{spec_path}': class_folders must name one folder per class ({len(spec.classes)}).")
    root = Path(spec.class_images).expanduser()
    root = root if root.is_absolute() else base / root
    folder_of = dict(zip(spec.classes, spec.class_folders or spec.classes))
    out: dict[str, list[str] | None] = {}
    for name, classes in sets.items():
        folders = [root / folder_of[c] for c in classes]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise ErasureError(
                f"'{spec_path}': class_images has no folder {missing[0]} (class folders are named by class_folders or the class names)."
            )
        out[name] = [str(f) for f in folders]
    return out


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
        target = spec.classes[(i + 1) % len(spec.classes)]
        others = [c for c in spec.classes if c != config.forget]
        return Concept(
            name=config.forget.replace(" ", "_"),
            concept=config.forget,
            words=config.forget,
            forget=[spec.template.format(config.forget)],
            target=[spec.template.format(target)],
            retain=[spec.template.format(c) for c in others],
            images=_class_images(spec, base, spec_path, {"forget": [config.forget], "target": [target], "retain": others}),
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
