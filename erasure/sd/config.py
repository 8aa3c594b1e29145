"""The schema of a Stable Diffusion erasure run, and of concept specs.

A run config (``configs/sd/*.yaml``) names the model, the concept spec, the method and
its hyper-parameters. A concept spec (``configs/sd/concepts/*.yaml``) says what to forget,
what to steer it to and what to keep, as prompts (files in ``prompts/``) or image folders.
A spec may also be a *class set* (e.g. Imagenette): ``classes`` and a ``template``; the
run then picks ``concept.forget``, the target is the next class and the others are kept.

Several concepts can be erased in one run: ``concept.spec`` may list spec files, a spec may
list others (``specs:``), and a class set may forget several classes (``concept.forget`` a
list). They resolve to one :class:`Concept` whose ``parts`` are the single concepts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from erasure.core.config import NON_NEGATIVE, Range, RunConfig, load_config
from erasure.core.errors import ErasureError


@dataclass
class SDModelConfig:
    """Which pipeline, and in what precision its frozen parts run."""

    pretrained: str = "CompVis/stable-diffusion-v1-4"  # hub id or local diffusers folder
    revision: str | None = None
    # The UNet weights that train, as a diffusers variant of the pipeline's UNet; the export
    # and the delta then start from them. null: the pipeline's own (SD v1.4's: the EMA
    # weights). "non_ema": the raw weights the references train (sd-v1-4-full-ema.ckpt loaded
    # with use_ema: False), e.g. CompVis/stable-diffusion-v1-4's unet/*.non_ema.safetensors.
    # The training images and the evaluations' "original" row keep the pipeline's own UNet.
    unet_variant: str | None = None
    frozen_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # VAE, text encoder, ESD teacher; auto = bf16 on GPU
    safety_checker: Literal[False] = False  # always off: the tool measures what the model generates


@dataclass
class ConceptConfig:
    """Which concept spec(s), and for class sets which class(es) to forget.

    A list of specs, or of classes, erases them all in one run (multi-concept erasure).
    """

    spec: str | list[str] = "configs/sd/concepts/nudity.yaml"
    forget: str | list[str] | None = None  # class name(s), for class-set specs


@dataclass
class GenerationConfig:
    """How the forget / target / retain training images are generated with the base model."""

    images_per_set: int = 800
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    batch_size: int | Literal["auto"] = 4  # auto: the largest that fits in free memory (see erasure.sd.generate)
    seed: int = 0
    resolution: int | None = None  # None: the model's native size (512 for SD 1.x)
    compile: bool = False  # torch.compile the UNet while generating (minutes of compiling; pays on the 1,600 images)


@dataclass
class SDMaskConfig:
    """The SalUn mask over the UNet: saliency of -MSE against the guided prediction.

    The defaults are the reference's (``generate_mask.py``): one pass over the forget set in
    dataset order, each image once (the last batch holds the rest), and the raw gradients
    summed without clipping.
    """

    ratio: float = 0.5
    per_layer: bool = False
    # None: one pass over the forget set in order, as the reference's unshuffled loader.
    # An int: that many batches drawn at random with replacement (our earlier default, 100).
    batches: int | None = None
    batch_size: int = 8
    guidance: float = 7.5
    # None: no clipping (the reference). A norm: each batch's gradient is clipped to it before
    # summing (our earlier default, 1.0, which the SalUn DDPM reference does; 0 is also off).
    clip_norm: float | None = None
    path: str | None = None  # reuse a saved mask


@dataclass
class SDTrainConfig:
    """Fine-tuning the UNet (every method uses the same loop)."""

    steps: int = 100
    # Passes over the forget set; when set, it replaces `steps` (steps = epochs x the batches of
    # one pass, ceil(forget images / (batch_size x processes))), so the length follows the set's
    # size as the reference's `--epochs` does. Methods with a forget set only (SalUn; FMN, which
    # still draws its batches at random).
    epochs: int | None = None
    batch_size: int = 8  # per process; SalUn draws this many forget and this many retain latents
    # The order SalUn reads its training images in. "epochs" (the reference before its last
    # rewrite, random_label.py@716e618, nsfw_removal.py@47377e3): the forget set in order, one
    # pass per epoch; beside it the retain set in a fresh random order per pass, restarted every
    # epoch. "random": every step draws both batches at random with replacement (our earlier default).
    data_order: Literal["epochs", "random"] = "epochs"
    # What a training image's latents are each time a step (or the SalUn mask) reads it.
    # "sample": a fresh draw from its VAE posterior, as the references encode every batch anew
    # (LatentDiffusion.get_input in SalUn's scripts, latent_dist.sample() in FMN's). "mean": the
    # posterior mean every time (our earlier default). Both come from one cached encoding.
    latents: Literal["sample", "mean"] = "sample"
    lr: float = 1e-5
    alpha: float = 0.1  # SalUn: weight of the retain loss
    # Off by default: neither the SalUn SD scripts nor ESD clip gradients, and FMN's clip is a
    # no-op (see erasure.sd.methods.fmn). Set a norm to clip.
    grad_clip: float | None = None
    weight_decay: float = 0.0
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"  # auto: on only where the step would not fit in GPU memory
    # The dtype the trained UNet's weights (and so Adam's moments) are held and updated in.
    # "fp32": every reference but one, and ours. "bf16": the newer ESD's esd_sd.py, which loads
    # the UNet in bf16 and lets Adam update it there, each step rounded to bf16; it computes
    # under bf16 autocast (mixed_precision auto or bf16), also on a CPU.
    weights_dtype: Literal["fp32", "bf16"] = "fp32"
    compile: bool = False  # torch.compile the UNet (the SalUn step compiles two graphs: over 3 min on an H100)
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0


@dataclass
class ESDConfig:
    """ESD: negative guidance from a frozen copy, on latents from a sampled trajectory.

    The defaults are the original ESD (CompVis ``train-esd.py``): target ε₀ − η(ε_c − ε₀).
    The newer diffusers ESD (rohitgandikota/erasing ``esd_sd.py``) is
    ``configs/sd/nudity_esd_diffusers.yaml``: ``anchor: concept`` (target ε_c − η(ε_c − ε₀)),
    eta 2, lr 5e-5, 200 iterations, ``params: linear``, ``trajectory: frozen``,
    ``timestep: matched``, ``sampler: pndm``, ``resolution: 1024``, bf16. The reference
    trains bf16 weights directly (Adam on bf16 parameters): ``train.weights_dtype: bf16``.
    """

    eta: float = 1.0  # negative-guidance strength η
    # What the target is anchored at. "uncond" (train-esd.py): ε₀ − η(ε_c − ε₀). "concept"
    # (esd_sd.py, without --erase_from): ε_c − η(ε_c − ε₀), i.e. the uncond anchor's
    # target at η − 1 (esd_sd.py's default η 2 is train-esd.py's η 1).
    anchor: Literal["uncond", "concept"] = "uncond"
    ddim_steps: int = 50
    start_guidance: float = 3.0  # guidance of the trajectory that produces x_t
    # Which UNet weights esd-u and esd-all train. "compvis": the original's sets (esd-u = all
    # but attn2, the time embedding and the output norm/conv; esd-all = every weight).
    # "linear": esd_sd.py's (only Linear and Conv2d weights, so no norms; esd-u = those outside attn2).
    params: Literal["compvis", "linear"] = "compvis"
    trajectory: Literal["trained", "frozen"] = "trained"  # which model draws x_t: original ESD / esd_sd.py
    # How far the trajectory runs and which timestep the UNets are then given.
    # "original" (train-esd.py): t_enc ~ U{0..ddim_steps-1}; its sampler stops after
    # ddim_steps - t_enc + 1 steps (all of them for t_enc 0 and 1), and the UNets get a DDPM
    # step drawn in [t_enc, t_enc + 1) * 1000 / ddim_steps, about two DDIM steps noisier
    # than x_t. "matched" (esd_sd.py): x_t after k ~ U{0..ddim_steps-1} steps, fed the DDIM
    # timestep it is at (pure noise for k = 0, never a finished sample).
    timestep: Literal["original", "matched"] = "original"
    # The sampler of the trajectory. "ddim" (train-esd.py: CompVis DDIM, eta 0, no x̂₀
    # clipping). "pndm": PLMS, diffusers' PNDMScheduler with skip_prk_steps - SD v1.4's own
    # scheduler, which esd_sd.py never replaces; its 50-step grid is 981, 961, 961, 941, ...,
    # 21, 1, so with timestep "matched" x_t after k steps is fed grid[k] (961 twice, never 1).
    # "pndm" needs timestep "matched" (the original's pairing is defined on the DDIM grid).
    sampler: Literal["ddim", "pndm"] = "ddim"
    # The trajectory's image size in px (latents of size/8 for SD). None: the model's native
    # size (512 for SD 1.x), as train-esd.py. esd_sd.py hard-codes height = width = 1024,
    # also for SD v1.4 (128×128 latents, about 4× the compute); the diffusers config sets it.
    resolution: int | None = None
    # Replay the trajectory's UNet calls as CUDA graphs (erasure.core.graphs): the same
    # computation with one launch per call instead of one per kernel. GPU only (ignored on a
    # CPU). The ESD-x step at batch 1 on an H200: 0.99 s eager, 0.42 s graphed in bf16
    # (benchmarks/results/sd_training_h200-gpu-check-esd.json).
    cuda_graph: bool = True


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
    # What each image is prompted with. "template" (train_attn.py): every image of a concept with
    # `template` filled in by the concept's snippet (its learned tokens under textual_inversion,
    # else its name), the positions the snippet's tokens. "forget": each image's own forget
    # prompt, the positions the spec's `words` in it (our earlier default).
    prompts: Literal["template", "forget"] = "template"
    template: str = "a photo of {}"  # the reference's object template; its style one: "a photo in the style of {}"
    # The reference's first stage (use_ti: true; train_ti.py with configs/ti.yaml): learn
    # `ti_tokens` new token embeddings per concept from its forget images, then prompt with them
    # (see erasure.sd.textual_inversion). SD 1.x/2.x (one text encoder); needs prompts=template.
    textual_inversion: bool = True
    ti_tokens: int = 4  # <s1>|<s2>|<s3>|<s4>
    ti_steps: int = 500  # max_train_steps_ti
    ti_lr: float = 1e-3  # learning_rate_ti, constant
    ti_weight_decay: float = 0.1  # weight_decay_ti (AdamW)


@dataclass
class UCEConfig:
    """UCE: the closed-form edit of every cross-attention key/value projection.

    The defaults are the reference's (rohitgandikota/unified-concept-editing,
    ``trainscripts/uce_sd_erase.py``): erase scale 1, preserve scale 1, lambda 0.5, both
    ``to_k`` and ``to_v`` of every ``attn2``, each prompt represented by its last token, and
    the erased concepts guided to the empty prompt ("" - the reference's default for objects;
    it uses "art" for styles).
    """

    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.5  # the weight of staying close to the original projection
    # What the erased concepts are mapped to: one prompt for all, or one per erased concept.
    guide: str | list[str] = ""
    # The concepts to preserve. None: the concept spec's retain prompts; [] (the reference's
    # default when --preserve_concepts is not given): none. Each is counted as often as it is
    # listed, as the reference's solve loops over its list (its dict only caches embeddings).
    preserve: list[str] | None = None
    # Extra erase prompts per concept, each guided like the concept itself, e.g. the
    # reference's --expand_prompts for art: ["painting by {}", "art by {}", "artwork by {}",
    # "picture by {}", "style of {}"].
    templates: list[str] = field(default_factory=list)
    with_to_k: bool = True  # False edits only to_v (an option of the reference's first scripts)


@dataclass
class ExportConfig:
    """What an erasure run writes besides its checkpoints."""

    pipeline: bool = True  # a full diffusers folder, loadable with StableDiffusionPipeline.from_pretrained
    delta: bool = True  # only the changed entries, applied onto the base model with `erasure sd apply-delta`


@dataclass
class SDConfig(RunConfig):
    """One Stable Diffusion erasure experiment."""

    workdir: str = "runs/sd"
    method: str = "salun"
    model: SDModelConfig = field(default_factory=SDModelConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    mask: SDMaskConfig = field(default_factory=SDMaskConfig)
    train: SDTrainConfig = field(default_factory=SDTrainConfig)
    esd: ESDConfig = field(default_factory=ESDConfig)
    fmn: FMNConfig = field(default_factory=FMNConfig)
    uce: UCEConfig = field(default_factory=UCEConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    RULES: ClassVar[dict[str, Range]] = {"mask.clip_norm": NON_NEGATIVE}  # 0 turns clipping off, as train.grad_clip

    def validate(self) -> None:
        """Checks that span keys."""
        if not 0.0 < self.mask.ratio <= 1.0:
            raise ErasureError("mask.ratio must lie in (0, 1].")
        from erasure.sd.generate import SCHEDULERS
        from erasure.sd.methods import SD_METHODS  # imported here: the methods import this module

        method = SD_METHODS.get(self.method)  # a misspelt method or sampler fails before any model is loaded
        if self.train.epochs is not None and "forget" not in method.needs:
            raise ErasureError(
                f"train.epochs counts passes over the forget set, and method '{self.method}' trains on none; "
                "set train.steps instead (train.epochs=null)."
            )
        if self.train.weights_dtype == "bf16" and self.mixed_precision == "no":
            raise ErasureError("train.weights_dtype=bf16 computes in bf16: set mixed_precision=bf16 or auto, or train.weights_dtype=fp32.")
        if self.method == "fmn" and self.fmn.textual_inversion and self.fmn.prompts != "template":
            raise ErasureError("fmn.textual_inversion prompts with learned tokens: set fmn.prompts=template or textual_inversion=false.")
        if "{}" not in self.fmn.template:
            raise ErasureError(f"fmn.template {self.fmn.template!r} has no '{{}}' for the concept; e.g. 'a photo of {{}}'.")
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
    words: str = ""  # fmn.prompts=forget: the words of the forget prompts whose attention FMN removes (e.g. "nude"); default: concept
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
    # A multi-concept spec: other spec files (relative to this one) erased together in one run.
    # Such a spec holds only a name and this list.
    specs: list[str] = field(default_factory=list)


@dataclass
class Concept:
    """A resolved concept: the prompt lists and image folders one run uses.

    For several concepts erased together, ``parts`` holds each one as resolved alone and the
    prompt lists are their union: ``forget`` and ``target`` concatenate the parts' lists in
    order, and ``retain`` keeps every part's retain prompts that no part forgets.
    """

    name: str
    concept: str
    words: str
    forget: list[str]
    target: list[str]
    retain: list[str]
    # set name -> real images: one folder, or one folder per prompt (class sets), or None (generate)
    images: dict[str, str | list[str] | None]
    parts: list[Concept] = field(default_factory=list)  # several concepts: each one alone; empty for one concept

    @property
    def concepts(self) -> list[Concept]:
        """The single concepts this run erases (itself, for one concept)."""
        return self.parts or [self]

    def part_of(self, set_name: str) -> list[int]:
        """For each prompt of ``set_name`` ('forget' or 'target'), the index of its concept in :attr:`concepts`."""
        return [k for k, part in enumerate(self.concepts) for _ in getattr(part, set_name)]

    def record(self) -> dict:
        """The concept as plain data for fingerprints and summaries.

        A single concept leaves out the empty ``parts``, so runs finished before
        multi-concept erasure existed keep their fingerprint.
        """
        values = dataclasses.asdict(self)
        if not self.parts:
            del values["parts"]
        return values


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
    """Read the concept spec(s) and resolve them (for class sets, around ``config.forget``).

    One spec and one class give a single :class:`Concept`; several specs, a multi-concept
    spec or several classes give one whose ``parts`` are the single concepts.
    """
    paths = [config.spec] if isinstance(config.spec, str) else list(config.spec)
    if not paths:
        raise ErasureError("concept.spec is an empty list; name at least one concept spec.")
    forget = [config.forget] if isinstance(config.forget, str) else config.forget
    found = {"class_set": False}
    parts: list[Concept] = []
    name = None
    for path in paths:
        spec_path = Path(path)
        spec = load_config(spec_path, schema=ConceptSpec)
        if spec.specs and len(paths) == 1:
            name = spec.name or spec_path.stem  # a multi-concept spec names the run
        parts += _resolve(spec_path, spec, forget, found, strict=len(paths) == 1 and not spec.specs)
    if forget is not None and not found["class_set"]:
        raise ErasureError(f"concept.forget is {config.forget!r}, but no concept spec of this run is a class set; leave it unset.")
    return parts[0] if len(parts) == 1 and name is None else merge_concepts(parts, name)


def _resolve(spec_path: Path, spec: ConceptSpec, forget: list[str] | None, found: dict, strict: bool) -> list[Concept]:
    """The single concepts of one spec file (several for a multi-concept spec or several forgotten classes)."""
    base = spec_path.parent
    if spec.specs:
        parts = []
        for sub in spec.specs:
            sub_path = Path(sub) if Path(sub).is_absolute() else base / sub
            sub_spec = load_config(sub_path, schema=ConceptSpec)
            parts += _resolve(sub_path, sub_spec, forget, found, strict=False)
        return parts
    if spec.classes:
        found["class_set"] = True
        return _class_concepts(spec_path, spec, forget or [])
    if forget is not None and strict:
        raise ErasureError(f"'{spec_path}' is not a class set, so concept.forget must be left unset.")
    sets = {name: getattr(spec, name) for name in ("forget", "target", "retain")}
    prompts = {name: _prompts(s, base, f"{spec_path}: {name}") for name, s in sets.items()}
    for name in ("forget", "target"):
        if not prompts[name]:
            raise ErasureError(f"the concept spec '{spec_path}' has no {name} prompts; add {name}.prompts or {name}.prompts_file.")
    if not prompts["retain"]:
        prompts["retain"] = prompts["target"]  # the reference nudity recipe keeps the clothed-person set
    concept = spec.concept or spec.name or spec_path.stem
    return [
        Concept(
            name=spec.name or spec_path.stem,
            concept=concept,
            words=spec.words or concept,
            forget=prompts["forget"],
            target=prompts["target"],
            retain=prompts["retain"],
            images={name: s.images for name, s in sets.items()},
        )
    ]


def _class_concepts(spec_path: Path, spec: ConceptSpec, forget: list[str]) -> list[Concept]:
    """One concept per forgotten class: the target is the next class not forgotten, the others not forgotten are kept."""
    unknown = [c for c in forget if c not in spec.classes] if forget else [None]
    if unknown:
        raise ErasureError(
            f"concept.forget is {unknown[0]!r}, which is not a class of '{spec_path}'; choose one of: {', '.join(spec.classes)}."
        )
    kept = [c for c in spec.classes if c not in forget]
    if not kept:
        raise ErasureError(f"concept.forget names every class of '{spec_path}'; at least one must be kept.")
    out = []
    for forgotten in forget:
        i = spec.classes.index(forgotten)
        # the next class in the list that is kept (with one class forgotten: simply the next one)
        target = next(c for c in spec.classes[i + 1 :] + spec.classes[:i] if c in kept)
        images = _class_images(spec, spec_path.parent, spec_path, {"forget": [forgotten], "target": [target], "retain": kept})
        out.append(
            Concept(
                name=forgotten.replace(" ", "_"),
                concept=forgotten,
                words=forgotten,
                forget=[spec.template.format(forgotten)],
                target=[spec.template.format(target)],
                retain=[spec.template.format(c) for c in kept],
                images=images,
            )
        )
    return out


def merge_concepts(parts: list[Concept], name: str | None = None) -> Concept:
    """Several concepts as one run's concept: union forget, target and retain sets, and the parts.

    Real images join only where every part gives one folder per prompt (class sets with
    ``class_images``); a set either all generated or all real per prompt.
    """
    names = [p.name for p in parts]
    if len(set(names)) < len(names):
        raise ErasureError(f"a concept is listed twice in this run ({', '.join(names)}); list each once.")
    forgotten = {prompt for p in parts for prompt in p.forget}
    images: dict[str, str | list[str] | None] = {}
    retain: dict[str, str | None] = {}  # prompt -> its real image folder (None: generated)
    for p in parts:
        folders = p.images.get("retain")
        for k, prompt in enumerate(p.retain):
            if prompt not in forgotten:
                retain.setdefault(prompt, folders[k] if isinstance(folders, list) else None)
    for set_name in ("forget", "target", "retain"):
        given = [p.images.get(set_name) for p in parts]
        if all(g is None for g in given):
            images[set_name] = None
        elif all(isinstance(g, list) for g in given):
            images[set_name] = list(retain.values()) if set_name == "retain" else [f for g in given for f in g]  # type: ignore[union-attr]
        else:
            raise ErasureError(
                f"the concepts {', '.join(names)} mix generated and real {set_name} images, or give them as one folder; "
                "a multi-concept run joins real images only per prompt (class sets with class_images). "
                "Generate them all (images: null) or erase the concepts in separate runs."
            )
    if not retain:
        raise ErasureError(f"the concepts {', '.join(names)} leave no retain prompt that is not also forgotten.")
    return Concept(
        name=name or "+".join(names),
        concept="; ".join(p.concept for p in parts),
        words="; ".join(p.words for p in parts),
        forget=[prompt for p in parts for prompt in p.forget],
        target=[prompt for p in parts for prompt in p.target],
        retain=list(retain),
        images=images,
        parts=parts,
    )
