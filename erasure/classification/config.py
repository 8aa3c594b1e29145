"""The schema of a classification-unlearning experiment (``erasure unlearn-classifier``).

Its defaults are a tiny offline experiment (sklearn's 8x8 digits, a narrow ResNet-18, a
few epochs) that runs on a CPU in about a minute. ``configs/classification/*.yaml`` hold
the CIFAR-10 protocols with the reference recipe. Epoch counts are converted to steps of
the shared training loop (``erasure.core.loop``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erasure.core.config import DataConfig, RunConfig
from erasure.core.errors import ErasureError


@dataclass
class SplitConfig:
    """Train / validation / test split (seeded)."""

    val_size: int = 137  # carved out of the dataset's train split (CIFAR-10: 5000 -> 45k / 5k)
    # true: each class gives its share of val_size (CIFAR-10: 500 of each class), as the reference's
    # per-class draw of 10%; false: a seeded draw over all images (erasure's earlier split).
    stratify: bool = True
    # own: the original model trains on a split of its own: its validation share is drawn again
    # (seed + 1) from the same images, so about val_size / (train + val) of the unlearning train
    # set (10% on CIFAR-10, forget set included) was held out from the original model and some
    # validation images were trained on. The reference does this: its original model's split is
    # drawn with seed 1 (main_train.py) and its unlearning split with --seed, default 2.
    # shared: one split for both (erasure's earlier behaviour; the original saw every train image).
    original: Literal["own", "shared"] = "own"
    original_seed: int | None = None  # the seed of the original model's own split; None: seed + 1
    train_limit: int | None = None  # keep a seeded subset of this many train images (reduced runs)
    test_limit: int | None = None  # keep a seeded subset of this many test images (reduced runs)
    seed: int = 0
    # Which generator draws the validation splits and the random forget set. torch: ours. numpy:
    # the reference's own draws replayed (numpy RandomState: per class in class order for the
    # validation splits, one choice over the train positions for the forget set), so with its
    # seeds (seed=2 original_seed=1 forget.seed=1) the index sets are the reference's exactly.
    rng: Literal["torch", "numpy"] = "torch"


@dataclass
class ForgetConfig:
    """Which training images to forget."""

    kind: Literal["random", "class"] = "random"
    fraction: float = 0.1  # random: share of the train split to forget
    class_index: int = 0  # class: the class to forget (also removed from the test set for TA)
    seed: int = 0


@dataclass
class NetConfig:
    """ResNet-18 with the CIFAR stem."""

    width: int = 16  # stage widths width * [1, 2, 4, 8]; 64 is the standard network
    # How pixels reach the first convolution. reference: as the reference model's first layer
    # (NormalizeByChannelMeanStd), (x - mean) / std per channel with the dataset's statistics
    # (CIFAR-10's; datasets it has none for are mapped to [-1, 1]). symmetric: [-1, 1] always
    # (erasure's earlier input).
    input_norm: Literal["reference", "symmetric"] = "reference"


@dataclass
class RecipeConfig:
    """Training from scratch (the original model and Retrain): SGD with momentum."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False  # the reference uses plain momentum; fast recipes may prefer Nesterov's
    weight_decay: float = 5e-4
    schedule: Literal["constant", "multistep", "cosine"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [91, 136])  # epochs (multistep)
    gamma: float = 0.1  # lr factor at each milestone (multistep)
    warmup_epochs: int = 0  # linear ramp from lr / warmup steps up to lr (then the schedule)
    label_smoothing: float = 0.0  # the original model and Retrain only; unlearning methods use plain CE
    augment: bool = False  # random crop (pad 4) + horizontal flip, on the device
    drop_last: bool = False  # skip each pass's last, smaller batch (the reference's loaders keep it)
    checkpoint_every: int = 0  # epochs; 0: only on interruption
    # Which epoch's weights the run keeps. best_val: the epoch with the highest accuracy on the
    # validation split (the first, on ties), as the reference's original model (model_SA_best,
    # chosen by validation accuracy after every epoch); last: the final epoch's, as its Retrain.
    select: Literal["last", "best_val"] = "last"
    # best_val with augment on: score the validation images cropped and flipped (a fresh seeded draw
    # each epoch), as the reference's validation set keeps the training transform; false: plain images.
    val_augment: bool = True
    seed: int = 0


@dataclass
class StepsConfig:
    """An unlearning method that trains for some epochs at a constant lr."""

    epochs: int = 10
    lr: float = 0.01


# How RL (and SalUn) schedule the forget set with random labels and the retain set:
#   passes       the reference's CIFAR-10 branch: each epoch, a pass over the forget set with labels
#                drawn uniformly over all classes (the true one included) afresh for every batch,
#                then a pass over the retain set with true labels.
#   mixed        the reference's CIFAR-100 / TinyImageNet branch: one shuffled mix of both sets, the
#                forget labels drawn uniformly over all classes once per epoch.
#   mixed_fixed  erasure's old behaviour: one shuffled mix, forget labels drawn once for the whole run
#                and never the true class (they get memorized; kept only for comparison).
RLSchedule = Literal["passes", "mixed", "mixed_fixed"]


@dataclass
class RLConfig:
    """RL: random labels on the forget set, true labels on the retain set."""

    epochs: int = 10
    lr: float = 0.01
    schedule: RLSchedule = "passes"


@dataclass
class L1Config:
    """FT plus gamma * ||theta||_1; gamma decays linearly, constant within an epoch (the reference's schedule).

    In epoch e (0-based) of E, gamma_e = gamma * (1 - e / (E - no_l1_epochs)) while
    e < E - no_l1_epochs, else 0; so with no_l1_epochs = 0 the last epoch uses gamma / E.
    """

    epochs: int = 10
    lr: float = 0.01
    gamma: float = 5e-4
    no_l1_epochs: int = 0  # trailing epochs without the l1 term (the reference's --no-l1-epochs, default 0)


@dataclass
class SalUnConfig:
    """RL restricted to the weights most salient to the forget set."""

    epochs: int = 10
    lr: float = 0.013
    ratio: float = 0.5  # fraction of weights that may change
    per_layer: bool = False
    schedule: RLSchedule = "passes"  # see RLSchedule
    # The reference computes the mask on forget images that pass its training transform (its
    # forget loader uses it): with unlearn.augment on, so do we. False: plain images.
    mask_augment: bool = True
    # hard: masked-out weights restored and their momentum zeroed after every step (the reference's
    # current RL.py). gradient: only their gradients masked, so weight decay and the momentum it feeds
    # still shrink them (the reference's RL.py before it restored them, commit ac880a2).
    mask_mode: Literal["hard", "gradient"] = "hard"


@dataclass
class IUConfig:
    """Influence unlearning: theta += alpha * F^-1 v, with v = (n_f / n) (mean forget gradient - mean retain gradient).

    F = damping * I + (1 / samples) * sum of g g^T over per-sample retain gradients g (the
    empirical Fisher WoodFisher estimates). ``solver`` picks how F^-1 v is computed:
      reference  the reference's recursion as written (streaming, O(P) memory, samples + 2
                 gradients read). Its running vector is only ever rescaled, so the result is
                 v minus a multiple of the first sample's gradient: in effect alpha * v.
      woodbury   the exact F^-1 v by the Woodbury identity (an N x N solve; N x P memory).
    """

    alpha: float = 0.2  # step size; the reference's --alpha default, grid-searched per model in its papers
    samples: int = 1000  # N: the reference's WoodFisher uses N = 1000
    damping: float = 1.0  # lambda
    damping_scale: Literal["absolute", "mean_diagonal"] = "absolute"  # mean_diagonal: lambda * F's mean diagonal entry
    solver: Literal["reference", "woodbury"] = "reference"
    # Every gradient on cropped and flipped images when unlearn.augment is on, as the reference's
    # (its IU runs while the loaders still apply the training transform); false: plain images.
    augment: bool = True
    # Which retain images give the per-sample gradients: first = the first ones in dataset order
    # (the reference's unshuffled loader); random = a seeded draw (erasure's earlier default).
    sample_order: Literal["first", "random"] = "first"


@dataclass
class UnlearnConfig:
    """The methods of the table and their settings (defaults: the reference's CIFAR-10 settings)."""

    methods: list[str] = field(default_factory=lambda: ["retrain", "ft", "rl", "ga", "iu", "l1", "salun"])
    batch_size: int = 256  # the reference's --batch_size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # The reference unlearns with its training transform (CIFAR-10: crops and flips); the
    # CIFAR configs set true. The embedded digits default trains and unlearns without.
    augment: bool = False
    # The reference's loaders keep each pass's last, smaller batch (no drop_last). In
    # train-mode BatchNorm a remainder of a few images is a bad step: on the digits default
    # at batch 128 the forget pass ends with 2 images and wrecks RL and SalUn. Named option.
    drop_last: bool = False
    checkpoint_every: int = 0  # epochs; 0: only on interruption
    seed: int = 0
    ft: StepsConfig = field(default_factory=lambda: StepsConfig(epochs=10, lr=0.01))
    rl: RLConfig = field(default_factory=RLConfig)
    ga: StepsConfig = field(default_factory=lambda: StepsConfig(epochs=5, lr=1e-4))  # the reference grid: lr 1e-4 .. 1e-3
    l1: L1Config = field(default_factory=L1Config)
    salun: SalUnConfig = field(default_factory=SalUnConfig)
    iu: IUConfig = field(default_factory=IUConfig)


@dataclass
class SweepConfig:
    """A grid over method settings, run against one original model and one Retrain.

    Each entry is ``key=v1,v2,...`` with ``key`` under ``unlearn.`` (e.g.
    ``unlearn.salun.lr=0.005,0.01,0.013,0.02``); the grid is their Cartesian product. For
    each method the run with the smallest average gap to Retrain is selected (ties: the
    first in grid order).
    """

    grid: list[str] = field(default_factory=list)


@dataclass
class ClassificationConfig(RunConfig):
    """One table: an original model, Retrain, and each unlearning method, scored the same way."""

    workdir: str = "runs/classification"
    # fp32 training and unlearning, as the reference. auto: bf16 autocast on a GPU (fp32 on a
    # CPU), a named deviation for speed that the *_fast configs take.
    mixed_precision: Literal["auto", "no", "bf16"] = "no"
    eval_batch_size: int = 512
    # fp32: metrics (and the MIA's confidences) from fp32 forward passes, as in the reference;
    # autocast: under the training precision (bf16 confidences near 1 are coarse and move the MIA).
    eval_precision: Literal["fp32", "autocast"] = "fp32"
    # The MIA's member examples (as many retain images as test images): first, the first ones in
    # dataset order, as the reference's SVC_MIA; random, a seeded draw over the retain set.
    mia_members: Literal["first", "random"] = "first"
    # Several processes (accelerate launch): BatchNorm normalizes each step with the statistics of
    # the whole global batch, as the reference's one-GPU run does (SyncBatchNorm on GPUs). false:
    # each process's shard only (plain DDP). No effect on one process.
    sync_batchnorm: bool = True
    # A finished original model to reuse instead of training one: another workdir, or its
    # ``original/`` folder (the reference's --model_path). Its data, split, model and train
    # settings must be this config's, so the three forgetting settings can share one model.
    original_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    model: NetConfig = field(default_factory=NetConfig)
    train: RecipeConfig = field(default_factory=lambda: RecipeConfig(select="best_val"))  # the original model
    retrain: RecipeConfig = field(default_factory=RecipeConfig)  # Retrain (the gold standard)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> None:
        """Checks that span keys, so that a bad value fails before any work starts."""
        from erasure.classification.methods import get_method

        for name in self.unlearn.methods:
            get_method(name)
        if len(set(self.unlearn.methods)) != len(self.unlearn.methods):
            raise ErasureError(f"unlearn.methods lists a method twice: {self.unlearn.methods}.")
        if self.forget.kind == "random" and not 0.0 < self.forget.fraction < 1.0:
            raise ErasureError(f"forget.fraction must lie in (0, 1), got {self.forget.fraction}.")
        if not 0 <= self.forget.class_index < 10:
            raise ErasureError(f"forget.class_index={self.forget.class_index} is not a class of {self.data.name} (0..9).")
        if not 0.0 < self.unlearn.salun.ratio <= 1.0:
            raise ErasureError("unlearn.salun.ratio must lie in (0, 1].")
        if self.split.val_size < 0:
            raise ErasureError("split.val_size must be >= 0.")
        if self.split.rng == "numpy" and (not self.split.stratify or self.split.train_limit is not None):
            raise ErasureError(
                "split.rng=numpy replays the reference's per-class draws over the whole train split: "
                "it needs split.stratify=true and no split.train_limit."
            )
        for key in ("train", "retrain"):
            recipe: RecipeConfig = getattr(self, key)
            if recipe.epochs < 1 or recipe.batch_size < 1:
                raise ErasureError(f"{key}.epochs and {key}.batch_size must be positive.")
            if not 0.0 <= recipe.label_smoothing < 1.0:
                raise ErasureError(f"{key}.label_smoothing must lie in [0, 1), got {recipe.label_smoothing}.")
            if recipe.warmup_epochs < 0 or recipe.warmup_epochs >= recipe.epochs:
                raise ErasureError(f"{key}.warmup_epochs={recipe.warmup_epochs} must lie in [0, {key}.epochs={recipe.epochs}).")
            if recipe.select == "best_val" and self.split.val_size == 0:
                raise ErasureError(f"{key}.select=best_val needs a validation split: set split.val_size > 0, or {key}.select=last.")
            if recipe.schedule == "multistep" and any(not 0 < m < recipe.epochs for m in recipe.milestones):
                raise ErasureError(f"{key}.milestones {recipe.milestones} must lie between 0 and {key}.epochs={recipe.epochs}.")
        l1 = self.unlearn.l1
        if not 0 <= l1.no_l1_epochs <= l1.epochs:
            raise ErasureError(f"unlearn.l1.no_l1_epochs={l1.no_l1_epochs} must lie in [0, unlearn.l1.epochs={l1.epochs}].")
        if self.unlearn.iu.samples < 1 or self.unlearn.iu.damping <= 0:
            raise ErasureError("unlearn.iu.samples and unlearn.iu.damping must be positive.")
        if self.sweep.grid:
            from erasure.classification.sweep import grid_points

            grid_points(self)  # builds and checks every point, so a misspelt key fails before any work
        if self.model.width < 1:
            raise ErasureError("model.width must be positive.")
