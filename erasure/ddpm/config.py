"""The DDPM path's config: data, base model, judge classifier, erasure, sampling, evaluation.

The defaults are the embedded demo (scikit-learn's 8x8 digits, CPU-sized), so
``erasure demo`` needs no file. Other experiments are YAML files in ``configs/`` that
override parts of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from erasure.core.config import AT_LEAST_ONE, NON_NEGATIVE, DataConfig, Range, RunConfig, load_config
from erasure.core.errors import ErasureError


@dataclass
class DdpmDataConfig(DataConfig):
    """The dataset, plus the DDPM path's augmentation."""

    # A random horizontal flip (p = 0.5) of every training image the DDPM sees: base-training
    # batches, erasure's forget and retain batches and the mask's forget batches, as the
    # reference's loaders do (``random_flip: true`` in its CIFAR-10 configs; configs/cifar10*.yaml
    # set it). Off here: flipping digits makes other glyphs (the reference has no digits or MNIST config).
    random_flip: bool = False


@dataclass
class ModelConfig:
    """The class-conditional UNet (diffusers ``UNet2DModel``)."""

    channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention: bool = False
    # With attention: the resolutions (px) whose levels get attention blocks, down and up (the
    # mid block always has one). None: every level but the first (our earlier layout); the
    # reference CIFAR-10 UNet: [16].
    attention_resolutions: list[int] | None = None
    # Channels per attention head; None: one head spanning all channels, as the reference's
    # AttnBlock. 8 was diffusers' default, our earlier layout.
    attention_head_dim: int | None = 8
    # Dropout in the ResNet blocks. The reference CIFAR-10 UNet: 0.1 (configs/cifar10*.yaml); the
    # demo's small model keeps 0.0 (the reference has no digits config).
    dropout: float = 0.0
    norm_groups: int = 8
    # The layout of the reference's Conditional_Model (the DDIM code base), or diffusers'.
    # "reference" (ddpm.model.ClassConcatUNet2DModel): time and class embeddings (the class one
    # through its own MLP) concatenated into every ResNet block, the timestep sinusoid as
    # [sin, cos] at frequencies exp(-ln(1e4)·i / (half - 1)), GroupNorm eps 1e-6, downsampling
    # convs that pad only the right and bottom edge. "diffusers": a plain UNet2DModel with the
    # class embedding added to the time embedding, [cos, sin] over half, eps 1e-5, symmetric
    # padding: our earlier layout.
    conventions: Literal["reference", "diffusers"] = "reference"
    num_train_timesteps: int = 1000


@dataclass
class TrainConfig:
    """Base-model (DDPM) training."""

    # 600 (was 800): on the demo, 600 steps and a 500-step classifier give UA 100% and
    # retained accuracy 99.6% (800/800: 100% and 99.2%) for 16% fewer CPU seconds.
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    # The learning rate after warm-up: cosine decay to 0 (the demo's), or constant, as the
    # reference's base training (plain Adam, no scheduler, no warm-up; configs/cifar10.yaml).
    schedule: Literal["cosine", "constant"] = "cosine"
    ema_decay: float = 0.995
    # False: the constant ema_decay from the first step, the average starting at the initial
    # weights, as the reference's EMAHelper (configs/cifar10*.yaml). True: diffusers' ramp
    # min(ema_decay, (1 + s) / (10 + s)), kept for the demo: over its 600 steps a constant 0.995
    # still holds 5% of the random start (0.995^600), and its original model dropped from
    # 99.4% to 96.6% retained accuracy (UA 1% -> 4%).
    ema_warmup: bool = True
    class_dropout: float = 0.1
    grad_clip: float = 1.0
    # The denoising loss: the per-element mean (the demo's), or summed over the pixels and averaged
    # over the batch, as the reference's base training (configs/cifar10.yaml), whose gradient is
    # then thousands of times larger, so grad_clip acts on every step.
    loss_reduction: Literal["mean", "sum"] = "mean"
    checkpoint_every: int = 200
    seed: int = 0
    # A batch's timesteps: half drawn, half mirrored (T - 1 - t), as the reference trains; iid: all drawn.
    timesteps: Literal["antithetic", "iid"] = "antithetic"
    # Which images a step reads: "epochs", shuffled passes over the train split whose last batch
    # holds the remainder, as the reference's cycled DataLoader(shuffle=True); "random", every
    # batch drawn with replacement (our earlier default). Each process of a multi-GPU job reads
    # its own order.
    data_order: Literal["epochs", "random"] = "epochs"


JUDGE_LR = {"cnn": 3e-3, "resnet34": 1e-5}  # classifier.lr: null takes its arch's; resnet34: train_classifier.py --lr


@dataclass
class ClassifierConfig:
    """The judge that scores generated images (UA, retained accuracy) and, without Inception weights, the FID's features.

    ``arch: cnn`` (the default; the demo, MNIST and ``cifar10_proof.yaml``): a small CNN
    trained from scratch at the data's resolution for ``steps`` random batches.
    ``arch: resnet34`` (``cifar10.yaml``): the SalUn DDPM reference's judge
    (``train_classifier.py``), torchvision's ResNet-34 from ImageNet weights with a new fc
    layer, fine-tuned on images resized to 224 px for ``epochs`` shuffled passes. Each arch
    reads its own keys (marked below) and ignores the other's.
    """

    arch: Literal["cnn", "resnet34"] = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # cnn: widths of its conv stages
    steps: int = 500  # cnn: test accuracy 98.9% on the digits' test split (800 steps: 99.4%)
    epochs: int = 10  # resnet34: passes over the train split (--n_epochs)
    batch_size: int = 128  # both; resnet34: --batch_size
    lr: float | None = None  # null: the arch's (JUDGE_LR); resnet34: the lr of every weight but the fc's
    head_lr_scale: float = 10.0  # resnet34: the fc layer's lr as a multiple of lr (the reference's lr * 10)
    # cnn: AdamW's decoupled decay; resnet34: Adam's L2 term on every weight, as the reference's Adam(weight_decay=5e-4).
    weight_decay: float = 5e-4
    pretrained: bool = True  # resnet34: start from torchvision's ImageNet weights (IMAGENET1K_V1); false: random init
    weights: str | None = None  # resnet34: a local copy of those weights (resnet34-b627a593.pth); null: torchvision's download
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.head_lr_scale < float("inf"):
            raise ErasureError(f"classifier.head_lr_scale is {self.head_lr_scale}; it must be a finite number > 0 (the reference: 10).")
        if self.weights is not None and not self.pretrained:
            raise ErasureError("classifier.weights is set but classifier.pretrained is false; drop one of them.")

    def resolved_lr(self) -> float:
        """The lr actually used: ``lr``, or the arch's when it is null."""
        return self.lr if self.lr is not None else JUDGE_LR[self.arch]


REFERENCE_SAMPLING = {"steps": 1000, "eta": 1.0}  # the SalUn DDPM sample.py defaults (--timesteps 1000 --eta 1)


@dataclass
class SampleConfig:
    """DDIM sampling with classifier-free guidance: (1 + w) * cond - w * uncond.

    ``protocol: fast`` (the default) uses ``steps`` and ``eta`` as set; ``protocol: reference``
    samples as the SalUn DDPM code does (1000 steps, eta 1, i.e. ancestral sampling), which
    is 40x slower than the fast default. Every report names the protocol it used.
    """

    protocol: Literal["fast", "reference"] = "fast"
    steps: int = 25
    guidance: float = 2.0  # the reference's cond_scale
    eta: float = 0.0

    def resolved(self) -> tuple[int, float]:
        """The (steps, eta) actually used."""
        if self.protocol == "reference":
            return REFERENCE_SAMPLING["steps"], REFERENCE_SAMPLING["eta"]
        return self.steps, self.eta


@dataclass
class MaskConfig:
    """The SalUn saliency mask."""

    ratio: float = 0.5  # fraction of weights that may change
    per_layer: bool = False  # threshold each tensor separately instead of globally
    # None: one pass over the forget set in a shuffled order, every image once and the last batch
    # holding the rest, as the reference's generate_mask loops over its forget DataLoader
    # (shuffle=True, no drop_last). An int: that many batches drawn at random with replacement
    # (our earlier default, 4; as the SD path's mask.batches).
    batches: int | None = None
    batch_size: int = 128
    # How the mask's denoising loss is reduced before each batch's gradient is clipped to norm 1:
    # "sum" over the pixels, mean over the batch, as the reference's generate_mask
    # (``(e - output).square().sum(dim=(1, 2, 3)).mean(dim=0)``), so the clip scales every batch
    # to unit norm; "mean": the per-element mean (our earlier default), whose gradient the clip seldom reaches.
    loss_reduction: Literal["sum", "mean"] = "sum"
    guidance: float = 2.0  # the forgetting loss is taken on the guided prediction
    path: str | None = None  # reuse a saved mask instead of computing one


@dataclass
class UnlearnConfig:
    """Erasing one class from the base model."""

    method: str = "salun"
    forget_class: int = 0
    target_shift: int = 1  # misaligned target class = (forget_class + shift) mod classes
    steps: int = 250  # the demo: 150 steps reach UA 97% once the reference's condition dropout is on, 250 reach 99%
    batch_size: int = 64  # per stream: this many forget and this many retain samples
    lr: float = 1e-3
    alpha: float = 1.0  # weight of the retain loss; both losses are per-element means
    # GA's retain weight. The reference's GA sums both of its terms over the pixels (the same
    # reduction on both sides), so its --alpha carries over 1:1 to our two per-element means,
    # unlike RL/SalUn's (whose forget term is a mean and retain term a sum). 1.0: train.py's --alpha default.
    ga_alpha: float = 1.0
    # Classifier-free-guidance condition dropout during erasure, as in the reference
    # ``saliency_unlearn``: its retain loss drops 10% of labels to the null class, which keeps
    # the unconditional branch that guidance uses anchored to the retained data; its forget
    # branch calls the model in train mode, where the same 10% dropout applies (drawn
    # separately for the prediction and for the misaligned target). 0 disables either.
    retain_cond_drop: float = 0.1
    forget_cond_drop: float = 0.1
    grad_clip: float | None = 1.0  # the reference clips the erasure gradient to norm 1; None: off
    checkpoint_every: int = 50
    seed: int = 0
    esd_eta: float = 1.0  # ESD negative-guidance strength (original ESD: 1; the SalUn DDPM script's default: 7.5)
    esd_ddim_steps: int = 50  # the DDIM grid ESD stops its trajectory on (reference: 50)
    esd_guidance: float = 2.0  # guidance of that trajectory (the SalUn DDPM script's cond_scale)
    # Which model draws ESD's intermediate x_t: the model being trained (original ESD and the
    # SalUn DDPM script) or the frozen base (the newer diffusers ESD).
    esd_trajectory: Literal["trained", "frozen"] = "trained"
    # How far ESD's trajectory runs and the timestep then fed, as SD's esd.timestep:
    # "original" (train-esd.py's pairing) or "matched" (esd_sd.py's; x_t's own DDIM timestep).
    esd_timestep: Literal["original", "matched"] = "original"
    esd_cuda_graph: bool = True  # the trajectory's UNet calls as CUDA graphs, as SD's esd.cuda_graph (GPU only; false: eager)
    # Timesteps of the forget, retain and mask batches: antithetic as the reference's
    # saliency_unlearn and generate_mask (each batch its own draw); iid: all drawn.
    timesteps: Literal["antithetic", "iid"] = "antithetic"
    # The forget and retain batches of each step: "epochs", each set read in shuffled passes (the
    # last batch of a pass smaller), as the reference's two cycled DataLoaders (shuffle=True, no
    # drop_last; CIFAR-10's forget set gives a batch of 8 every 40th step); "random", drawn with
    # replacement (our earlier default).
    data_order: Literal["epochs", "random"] = "epochs"
    # The weights erasure (and its mask) starts from: the base's raw training weights, as the
    # reference's saliency_unlearn, generate_mask and train_esd load them (states[0]), or its
    # EMA weights, which the "original" row is sampled with.
    start_weights: Literal["raw", "ema"] = "raw"
    mask: MaskConfig = field(default_factory=MaskConfig)


@dataclass
class FidConfig:
    """Which features the FID uses."""

    features: Literal["auto", "inception", "classifier"] = "auto"
    weights: str | None = None  # local torch-fidelity Inception weights (offline use)
    batch_size: int = 64
    real_images: int | None = None  # cap on real reference images (a seeded subset); None = all
    # The first N real images of each retained class (in dataset order), as the reference's
    # save_base_dataset.py takes 500 per class from the CIFAR-10 train split; None = all of them.
    # Exclusive with real_images.
    real_images_per_class: int | None = None


@dataclass
class EvalConfig:
    """Scoring generated images."""

    samples_per_class: int = 100
    # Images generated per retained class for the FID and the retained accuracy; None: samples_per_class.
    # The forgotten class always gets samples_per_class (UA). The reference: 500 for UA
    # (sample_one_class), 5,000 per retained class for the FID (README's sample_fid).
    fid_samples_per_class: int | None = None
    grid_samples: int = 6  # images per cell of the comparison grid
    seed: int = 1234
    # Images per sampling batch; under accelerate launch the batches are shared out among the
    # processes. With eta > 0 the sampler's noise is drawn per batch, so it is part of the samples' key.
    batch_size: int = 256
    methods: list[str] = field(default_factory=lambda: ["salun"])
    fid: FidConfig = field(default_factory=FidConfig)
    # Which real split the retained-class FID compares against: the training images (as
    # before) or the held-out test split, which no model saw.
    fid_real_split: Literal["train", "test"] = "train"


@dataclass
class Config(RunConfig):
    """One experiment: data, base model, classifier, erasure and evaluation."""

    RULES: ClassVar[dict[str, Range]] = {
        "model.dropout": Range(0, 1, high_open=True),
        "attention_resolutions": AT_LEAST_ONE,
        "attention_head_dim": AT_LEAST_ONE,
        "ga_alpha": NON_NEGATIVE,
        "fid_samples_per_class": AT_LEAST_ONE,
        "real_images_per_class": AT_LEAST_ONE,
    }

    workdir: str = "runs/demo"
    data: DdpmDataConfig = field(default_factory=DdpmDataConfig)
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
        for name in ("retain_cond_drop", "forget_cond_drop"):
            if not 0.0 <= getattr(self.unlearn, name) <= 1.0:
                raise ErasureError(f"unlearn.{name} must lie in [0, 1].")
        defaults = SampleConfig()
        if self.sample.protocol == "reference" and (self.sample.steps, self.sample.eta) != (defaults.steps, defaults.eta):
            raise ErasureError("sample.protocol=reference fixes steps=1000 and eta=1; leave sample.steps and sample.eta unset.")
        if self.eval.batch_size < 1:
            raise ErasureError(f"eval.batch_size={self.eval.batch_size}: give a whole number >= 1 (images per sampling batch).")
        if self.unlearn.target_shift % 10 == 0:
            raise ErasureError("unlearn.target_shift must not map the forgotten class onto itself.")
        if self.eval.fid.real_images is not None and self.eval.fid.real_images_per_class is not None:
            raise ErasureError("eval.fid.real_images and eval.fid.real_images_per_class both pick the real FID set; set one of them.")
        if not self.model.channels or any(c % self.model.norm_groups for c in self.model.channels):
            raise ErasureError("model.channels must be non-empty multiples of model.norm_groups.")
        from erasure.ddpm.methods import get_method  # imported here: the methods import this module

        for name in [self.unlearn.method, *self.eval.methods]:
            get_method(name)  # a misspelt method fails before any training, naming the choices


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The DDPM config: defaults (the demo), then the YAML file, then ``key=value`` overrides."""
    return load_config(path, overrides, schema=Config)
