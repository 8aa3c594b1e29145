"""The schema of a classification-unlearning experiment (``erasure unlearn-classifier``).

Its defaults are a tiny offline experiment (sklearn's 8x8 digits, a narrow ResNet-18, a
few epochs) that runs on a CPU in about a minute. ``configs/classification/*.yaml`` hold
the CIFAR-10 protocols with the reference recipe. Epoch counts are converted to steps of
the shared training loop (``erasure.core.loop``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from erasure.core.data import DataConfig
from erasure.core.errors import ErasureError


@dataclass
class SplitConfig:
    """Train / validation / test split (seeded)."""

    val_size: int = 137  # carved out of the dataset's train split (CIFAR-10: 5000 -> 45k / 5k)
    train_limit: int | None = None  # keep a seeded subset of this many train images (reduced runs)
    test_limit: int | None = None  # keep a seeded subset of this many test images (reduced runs)
    seed: int = 0


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


@dataclass
class RecipeConfig:
    """Training from scratch (the original model and Retrain): SGD with momentum."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["constant", "multistep", "cosine"] = "cosine"
    milestones: list[int] = field(default_factory=lambda: [91, 136])  # epochs (multistep)
    gamma: float = 0.1  # lr factor at each milestone (multistep)
    warmup_epochs: int = 0
    augment: bool = False  # random crop (pad 4) + horizontal flip, on the device
    checkpoint_every: int = 0  # epochs; 0: only on interruption
    seed: int = 0


@dataclass
class StepsConfig:
    """An unlearning method that trains for some epochs at a constant lr."""

    epochs: int = 5
    lr: float = 0.01


@dataclass
class L1Config:
    """FT plus gamma * ||theta||_1, gamma decaying linearly to 0 over the epochs."""

    epochs: int = 5
    lr: float = 0.01
    gamma: float = 5e-4


@dataclass
class SalUnConfig:
    """RL restricted to the weights most salient to the forget set."""

    epochs: int = 5
    lr: float = 0.013
    ratio: float = 0.5  # fraction of weights that may change
    per_layer: bool = False


@dataclass
class IUConfig:
    """Influence unlearning: one Newton step with a WoodFisher (empirical Fisher) inverse."""

    alpha: float = 1e-5  # step size; depends on the model, tune it (the reference grid-searches it)
    samples: int = 128  # per-sample retain gradients in the Fisher
    damping: float = 1.0  # lambda in F = lambda * I + G^T G / samples, in units of F's mean diagonal


@dataclass
class UnlearnConfig:
    """The methods of the table and their settings."""

    methods: list[str] = field(default_factory=lambda: ["retrain", "ft", "rl", "ga", "iu", "l1", "salun"])
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    checkpoint_every: int = 0  # epochs; 0: only on interruption
    seed: int = 0
    ft: StepsConfig = field(default_factory=lambda: StepsConfig(epochs=5, lr=0.01))
    rl: StepsConfig = field(default_factory=lambda: StepsConfig(epochs=5, lr=0.01))
    ga: StepsConfig = field(default_factory=lambda: StepsConfig(epochs=3, lr=1e-3))
    l1: L1Config = field(default_factory=L1Config)
    salun: SalUnConfig = field(default_factory=SalUnConfig)
    iu: IUConfig = field(default_factory=IUConfig)


@dataclass
class ClassificationConfig:
    """One table: an original model, Retrain, and each unlearning method, scored the same way."""

    workdir: str = "runs/classification"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # bf16 autocast; fp16 would need loss scaling
    eval_batch_size: int = 512
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    model: NetConfig = field(default_factory=NetConfig)
    train: RecipeConfig = field(default_factory=RecipeConfig)  # the original model
    retrain: RecipeConfig = field(default_factory=RecipeConfig)  # Retrain (the gold standard)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)

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
        for key in ("train", "retrain"):
            recipe: RecipeConfig = getattr(self, key)
            if recipe.epochs < 1 or recipe.batch_size < 1:
                raise ErasureError(f"{key}.epochs and {key}.batch_size must be positive.")
            if recipe.schedule == "multistep" and any(not 0 < m < recipe.epochs for m in recipe.milestones):
                raise ErasureError(f"{key}.milestones {recipe.milestones} must lie between 0 and {key}.epochs={recipe.epochs}.")
        if self.model.width < 1:
            raise ErasureError("model.width must be positive.")
