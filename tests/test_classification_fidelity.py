"""Classification unlearning follows the reference protocols: each test pins one semantic (tiny, CPU)."""

import csv
import json
import os
import signal
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from erasure.classification.config import ClassificationConfig
from erasure.classification.data import make_split
from erasure.classification.methods import UnlearnContext, get_method
from erasure.classification.methods.iu import woodbury_solve, woodfisher_reference
from erasure.classification.methods.l1 import l1_gamma
from erasure.classification.methods.rl import rl_passes
from erasure.classification.metrics import mia_efficacy, predict
from erasure.classification.model import resnet18
from erasure.classification.sweep import grid_points, own_label, parse_grid, run_sweep, select, swept_methods
from erasure.classification.train import PassSchedule, fit
from erasure.cli import main
from erasure.core.config import load_config
from erasure.core.data import EpochSampler
from erasure.core.errors import ErasureError
from erasure.core.io import load_checkpoint, load_tensors
from erasure.core.loop import LoopSettings, make_accelerator, step_generator, train
from erasure.core.saliency import Mask, MaskConstraint
from tests.conftest import DEVICE, no_host_sync
from tests.test_classification import TINY_TABLE, tiny_context

K = 4  # classes in the tiny data


pytestmark = pytest.mark.usefixtures("one_thread")


def labelled_context(folder, n_forget=40, n_retain=24, **overrides) -> tuple[UnlearnContext, torch.nn.Module]:
    """Images whose pixels spell their true label: forget images hold the value y, retain images 128 + y.

    So a batch seen by the model tells which set it came from and each image's true label.
    """
    opts = [*TINY_TABLE, "unlearn.batch_size=8", "unlearn.augment=false", *[f"{k}={v}" for k, v in overrides.items()]]
    config = load_config(None, opts, schema=ClassificationConfig)
    g = torch.Generator().manual_seed(0)
    yf, yr = torch.randint(0, K, (n_forget,), generator=g), torch.randint(0, K, (n_retain,), generator=g)
    xf = yf.to(torch.uint8)[:, None, None, None].expand(-1, 3, 8, 8).contiguous()
    xr = (128 + yr).to(torch.uint8)[:, None, None, None].expand(-1, 3, 8, 8).contiguous()
    ctx = UnlearnContext(config, make_accelerator(DEVICE), folder, "test", xf, yf, xr, yr, num_classes=K)
    torch.manual_seed(0)
    return ctx, resnet18(K, 3, width=4)


def decode(x: torch.Tensor) -> torch.Tensor:
    """The pixel value of each image of a model-range batch (constant images)."""
    return ((x[:, 0, 0, 0] + 1) * 127.5).round().long()


def schedule_batches(ctx: UnlearnContext, schedule: str, epochs: int, seed: int = 0) -> list:
    passes = rl_passes(ctx, schedule)
    plan = PassSchedule(passes, ctx.config.unlearn.batch_size, seed)
    dev = torch.device("cpu")
    return [plan.batch(s, step_generator(seed, s, 0, dev)) for s in range(epochs * plan.steps_per_epoch)], plan


# ----------------------------------------------------------------------------- split and the original model


def test_the_validation_split_takes_each_class_its_share_as_the_reference():
    """The reference draws 10% of each CIFAR-10 class (500 each) for validation; split.stratify=false draws over all images."""
    labels = torch.arange(50_000) % 10
    labels = labels[torch.randperm(50_000, generator=torch.Generator().manual_seed(1))]
    config = load_config(None, ["split.val_size=5000"], schema=ClassificationConfig)
    split = make_split(labels, torch.arange(10_000) % 10, config.split, config.forget)
    assert torch.bincount(labels[split.val]).tolist() == [500] * 10
    assert len(split.train) == 45_000 and not set(split.val.tolist()) & set(split.train.tolist())
    assert len(split.forget) == 4_500  # random 10% of the 45k, as the reference's 4,500
    # Uneven classes: each gets its share, rounded so that the shares sum to val_size.
    uneven = torch.tensor([0] * 70 + [1] * 30 + [2] * 50)
    config = load_config(None, ["split.val_size=40"], schema=ClassificationConfig)
    assert torch.bincount(uneven[make_split(uneven, uneven, config.split, config.forget).val]).tolist() == [19, 8, 13]
    plain = load_config(None, ["split.val_size=5000", "split.stratify=false"], schema=ClassificationConfig)
    counts = torch.bincount(labels[make_split(labels, labels, plain.split, plain.forget).val])
    assert counts.sum() == 5000 and counts.tolist() != [500] * 10


def test_the_original_model_trains_on_a_split_of_its_own_as_the_reference():
    """The reference draws its original model's validation split with seed 1 and its unlearning split with seed 2.

    So the original model never trained on about 10% of the unlearning train set (forget set
    included): its own validation images. split.original=shared keeps one split for both.
    """
    labels = torch.arange(50_000) % 10
    labels = labels[torch.randperm(50_000, generator=torch.Generator().manual_seed(1))]
    test_labels = torch.arange(10_000) % 10
    own = load_config(None, ["split.val_size=5000"], schema=ClassificationConfig)
    assert own.split.original == "own"
    split = make_split(labels, test_labels, own.split, own.forget)
    assert torch.bincount(labels[split.original_val]).tolist() == [500] * 10 and len(split.original_train) == 45_000
    assert set(split.original_train.tolist()) | set(split.original_val.tolist()) == set(range(50_000))
    assert not set(split.original_train.tolist()) & set(split.original_val.tolist())
    held_out = torch.isin(split.train, split.original_val)
    assert 4_000 < int(held_out.sum()) < 5_000  # about 10% of the 45k, as the reference's 4,488
    unseen = int((~torch.isin(split.forget, split.original_train)).sum())
    assert 350 < unseen < 560  # about 10% of the 4,500 forget images (the reference's: 463)
    shared = load_config(None, ["split.val_size=5000", "split.original=shared"], schema=ClassificationConfig)
    one = make_split(labels, test_labels, shared.split, shared.forget)
    assert torch.equal(one.original_train, one.train) and torch.equal(one.original_val, one.val)
    for name in ("train", "val", "forget", "retain", "test"):  # the unlearning split does not depend on the option
        assert torch.equal(getattr(one, name), getattr(split, name)), name
    # A reduced run draws the original model's split from its own images only (train and val together).
    reduced = load_config(None, ["split.val_size=500", "split.train_limit=4500"], schema=ClassificationConfig)
    small = make_split(labels, test_labels, reduced.split, reduced.forget)
    pool = set(small.train.tolist()) | set(small.val.tolist())
    assert set(small.original_train.tolist()) | set(small.original_val.tolist()) == pool and len(small.original_train) == 4_500


def test_split_rng_numpy_replays_the_references_draws():
    """split.rng=numpy: the reference's cifar10_dataloaders and replace_class draws, written out here with numpy.

    Validation: one RandomState(seed), for each class in order a choice of 10% of its images;
    train: the rest, sorted; forget: RandomState(forget.seed).choice over the train positions.
    The original model's split is the same draw with original_seed.
    """
    import numpy as np

    labels = torch.arange(2_000) % 10
    labels = labels[torch.randperm(2_000, generator=torch.Generator().manual_seed(3))]
    y = labels.numpy()

    def reference(seed):
        rng = np.random.RandomState(seed)
        val = np.hstack([rng.choice(np.where(y == c)[0], int(0.1 * (y == c).sum()), replace=False) for c in range(10)])
        return np.array(sorted(set(range(len(y))) - set(val))), np.sort(val)

    opts = ["split.val_size=200", "split.rng=numpy", "split.seed=2", "split.original_seed=1", "forget.seed=1"]
    config = load_config(None, opts, schema=ClassificationConfig)
    split = make_split(labels, torch.arange(100) % 10, config.split, config.forget)
    train, val = reference(2)
    original_train, original_val = reference(1)
    forget = train[np.random.RandomState(1).choice(np.arange(len(train)), 180, replace=False)]
    assert split.train.tolist() == train.tolist() and split.val.tolist() == val.tolist()
    assert split.original_train.tolist() == original_train.tolist() and split.original_val.tolist() == original_val.tolist()
    assert split.forget.tolist() == sorted(forget.tolist())
    for bad in (["split.stratify=false"], ["split.train_limit=100"]):
        with pytest.raises(ErasureError, match="split.rng=numpy"):
            load_config(None, [*opts, *bad], schema=ClassificationConfig)


def original_fit(folder, epochs: int, select: str, val=None):
    """The tiny original model's training (constant lr, so a shorter run is the longer run's prefix)."""
    recipe = {"epochs": epochs, "batch_size": 16, "lr": 0.05, "schedule": "constant", "select": select}
    opts = [*TINY_TABLE, *(f"train.{k}={v}" for k, v in recipe.items())]
    config = load_config(None, opts, schema=ClassificationConfig)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long() + 2 * (images[:, 0, 0, 0] > 127).long()
    torch.manual_seed(0)
    model = resnet18(K, 3, width=4)
    accelerator = make_accelerator(DEVICE)
    val = (images[:32], labels[:32]) if val is None else val
    return fit(model, images, labels, config.train, folder, accelerator, "test", desc="original", val=val), val


def test_the_original_model_is_the_best_validation_epoch_as_the_reference(tmp_path, capsys):
    """The reference's original model is model_SA_best: the first epoch with the highest validation accuracy.

    Its weights are the ones that epoch ended with: training only that many epochs with
    select=last gives the same tensors, bit for bit. The progress bar shows the scores as
    they come (a run stopped by a time limit has told them).
    """
    model, val = original_fit(tmp_path / "best", 6, "best_val")
    record = json.loads((tmp_path / "best" / "selection.json").read_text())
    scores = record["scores"]
    last_bar = [line for line in capsys.readouterr().err.split("\r") if "val=" in line][-1]
    assert f"val={scores[-1]:.2f}%" in last_bar and f"best={max(scores):.2f}% (epoch {record['epoch']})" in last_bar
    assert len(scores) == 6 and record["epoch"] == scores.index(max(scores)) + 1 and record["val_images"] == 32
    assert predict(model, *val, 64, make_accelerator(DEVICE)).accuracy == record["val_accuracy"] == max(scores)
    prefix, _ = original_fit(tmp_path / "prefix", record["epoch"], "last")
    for name, value in prefix.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    assert not (tmp_path / "prefix" / "selection.json").exists()
    # The defaults: the original model keeps its best epoch, Retrain its last (the reference's unlearn loop keeps no best).
    defaults = load_config(None, [], schema=ClassificationConfig)
    assert (defaults.train.select, defaults.retrain.select) == ("best_val", "last")
    yaml_like = load_config(None, ["train.epochs=3"], schema=ClassificationConfig)  # a partial train: section keeps it
    assert yaml_like.train.select == "best_val"
    with pytest.raises(ErasureError, match="select=best_val needs a validation split"):
        load_config(None, ["split.val_size=0"], schema=ClassificationConfig)
    # Retrain may keep its best epoch too (a named option): the table hands it the validation split.
    workdir = tmp_path / "table"
    args = ["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE, "unlearn.methods=[retrain]", "retrain.select=best_val"]
    assert main(args) == 0
    for stage in ("original", "retrain"):
        kept = json.loads((workdir / stage / "selection.json").read_text())
        assert json.loads((workdir / stage / "done.json").read_text())["selected"] == {k: kept[k] for k in ("epoch", "val_accuracy")}
    # The original model's own split (split.original: own) left part of the forget set unseen; the table says how much.
    assert json.loads((workdir / "results.json").read_text())["sizes"]["forget_unseen_by_original"] > 0
    shared = tmp_path / "shared"
    assert main(["unlearn-classifier", "--workdir", str(shared), *TINY_TABLE, "unlearn.methods=[retrain]", "split.original=shared"]) == 0
    assert json.loads((shared / "results.json").read_text())["sizes"]["forget_unseen_by_original"] == 0
    ctx, model = tiny_context(tmp_path / "no-val", **{"retrain.select": "best_val"})  # a context without validation images
    with pytest.raises(ErasureError, match="retrain: select=best_val needs validation images"):
        get_method("retrain")(ctx).run(model)


def test_the_best_epoch_is_chosen_on_augmented_validation_images_as_the_reference(tmp_path):
    """The reference's validation set is a copy of the training set with its crop-and-flip transform.

    With augmentation on, each epoch scores a fresh seeded crop and flip of the validation
    images; ``val_augment=false`` scores them plain.
    """
    from erasure.classification.data import augment
    from erasure.classification.train import BestOnValidation

    g = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (48, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, K, (48,), generator=g)
    torch.manual_seed(0)
    model, accelerator = resnet18(K, 3, width=4).to(DEVICE), make_accelerator(DEVICE)
    images, labels = images.to(DEVICE), labels.to(DEVICE)
    seen = BestOnValidation(images, labels, 5, accelerator, augment_seed=3)
    for step in (5, 10):
        seen.after_step(model, step)
    for epoch, score in zip((1, 2), seen.scores):
        cropped = augment(images, torch.Generator(images.device).manual_seed(3 * 1_000_003 + epoch))
        assert score == predict(model, cropped, labels, 512, accelerator).accuracy
    assert seen.record()["val_augmented"]
    plain = BestOnValidation(images, labels, 5, accelerator)
    plain.after_step(model, 5)
    assert plain.scores[0] == predict(model, images, labels, 512, accelerator).accuracy and not plain.record()["val_augmented"]
    config = load_config(None, [], schema=ClassificationConfig)
    assert config.train.val_augment and config.retrain.val_augment


def test_the_best_epoch_survives_an_interruption(tmp_path, monkeypatch):
    """The kept weights and the scores travel with the checkpoint: a resumed run selects what the straight one did."""
    straight, _ = original_fit(tmp_path / "straight", 6, "best_val")
    original_ce, calls = F.cross_entropy, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 14:  # in epoch 4 (4 steps an epoch), after three epochs' scores
            os.kill(os.getpid(), signal.SIGINT)
        return original_ce(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupt)
    with pytest.raises(KeyboardInterrupt):
        original_fit(tmp_path / "resumed", 6, "best_val")
    state = load_checkpoint(tmp_path / "resumed" / "checkpoint")
    assert state["step"] == 14 and len(state["monitor_values"]["scores"]) == 3 and state["monitor"]
    monkeypatch.setattr(F, "cross_entropy", original_ce)
    resumed, _ = original_fit(tmp_path / "resumed", 6, "best_val")
    read = [json.loads((tmp_path / run / "selection.json").read_text()) for run in ("straight", "resumed")]
    assert read[0] == read[1]
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


# ----------------------------------------------------------------------------- RL / SalUn schedule


def test_rl_runs_a_forget_pass_then_a_retain_pass_each_epoch(tmp_path):
    ctx, _ = labelled_context(tmp_path)  # 40 forget (5 batches of 8), 24 retain (3 batches)
    batches, plan = schedule_batches(ctx, "passes", epochs=3)
    assert plan.steps_per_epoch == 8
    assert [b.pass_index for b in batches] == ([0] * 5 + [1] * 3) * 3
    for epoch in range(3):
        chunk = batches[epoch * 8 : (epoch + 1) * 8]
        assert all(b.epoch == epoch for b in chunk)
        assert sorted(torch.cat([b.indices for b in chunk[:5]]).tolist()) == list(range(40))  # each forget image once
        assert sorted(torch.cat([b.indices for b in chunk[5:]]).tolist()) == list(range(24))  # each retain image once
        for b in chunk[5:]:
            assert torch.equal(b.labels, ctx.retain_labels[b.indices])  # retain pass: true labels


def test_rl_forget_labels_are_redrawn_per_batch_over_all_classes(tmp_path):
    ctx, _ = labelled_context(tmp_path)
    batches, _ = schedule_batches(ctx, "passes", epochs=4)
    forget = [b for b in batches if b.pass_index == 0]
    drawn = torch.cat([b.labels for b in forget])
    true = torch.cat([ctx.forget_labels[b.indices] for b in forget])
    assert set(drawn.tolist()) == set(range(K))  # uniform over all classes ...
    assert (drawn == true).any() and (drawn != true).any()  # ... the true class included
    assert 0.1 < (drawn == true).float().mean() < 0.45  # about 1/K of the time
    # Fresh labels every epoch: the same image gets independent draws.
    per_epoch = []
    for epoch in range(4):
        labels = torch.empty(40, dtype=torch.long)
        for b in forget[epoch * 5 : (epoch + 1) * 5]:
            labels[b.indices] = b.labels
        per_epoch.append(labels)
    assert all(not torch.equal(per_epoch[0], other) for other in per_epoch[1:])
    # Reproducible from (seed, step) alone, so a resumed run draws the same labels.
    again, _ = schedule_batches(ctx, "passes", epochs=4)
    assert all(torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices) for a, b in zip(batches, again))
    other_seed, _ = schedule_batches(ctx, "passes", epochs=4, seed=1)
    assert not all(torch.equal(a.labels, b.labels) for a, b in zip(batches, other_seed))


def test_named_mixed_schedules(tmp_path):
    ctx, _ = labelled_context(tmp_path)
    # mixed (the reference's CIFAR-100 branch): one shuffled mix, forget labels redrawn each epoch over all classes.
    batches, plan = schedule_batches(ctx, "mixed", epochs=3)
    assert plan.steps_per_epoch == 8 and {b.pass_index for b in batches} == {0}
    epochs = []
    for epoch in range(3):
        labels = torch.empty(64, dtype=torch.long)
        for b in batches[epoch * 8 : (epoch + 1) * 8]:
            labels[b.indices] = b.labels
        assert torch.equal(labels[40:], ctx.retain_labels)
        epochs.append(labels[:40])
    assert not torch.equal(epochs[0], epochs[1]) and (torch.stack(epochs) == ctx.forget_labels).any()
    # mixed_fixed (erasure's old behaviour): drawn once, never the true class.
    batches, _ = schedule_batches(ctx, "mixed_fixed", epochs=2)
    seen = [torch.empty(64, dtype=torch.long) for _ in range(2)]
    for b in batches:
        seen[b.epoch][b.indices] = b.labels
    assert torch.equal(seen[0], seen[1]) and not (seen[0][:40] == ctx.forget_labels).any()


@pytest.mark.parametrize("name", ["rl", "salun"])
def test_method_trains_forget_then_retain_with_fresh_labels(tmp_path, monkeypatch, name):
    """End to end through the loop: what the model sees, step by step, with which labels."""
    ctx, model = labelled_context(tmp_path, **{f"unlearn.{name}.epochs": 2})
    seen: list[tuple[bool, torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, decode(args[0]))))
    original_ce = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        labels.append(target.clone())
        return original_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    get_method(name)(ctx).run(model)
    steps = [(pixels, y) for (training, pixels), y in zip(seen, labels) if training]  # SalUn's mask pass runs in eval mode
    assert len(steps) == 2 * 8
    kinds = ["retain" if (pixels >= 128).all() else "forget" if (pixels < 128).all() else "mixed" for pixels, _ in steps]
    assert kinds == (["forget"] * 5 + ["retain"] * 3) * 2
    forget_true = torch.cat([pixels for (pixels, _), k in zip(steps, kinds) if k == "forget"])
    forget_drawn = torch.cat([y for (_, y), k in zip(steps, kinds) if k == "forget"])
    assert (forget_drawn == forget_true).any() and (forget_drawn != forget_true).any()
    for (pixels, y), k in zip(steps, kinds):
        if k == "retain":
            assert torch.equal(y, pixels - 128)


def test_passes_keep_the_remainder_batch_unless_drop_last(tmp_path):
    """The reference's loaders (shuffle=True, no drop_last) end each pass with the remainder; drop_last is a named option."""
    ctx, _ = labelled_context(tmp_path, n_forget=42, n_retain=26)  # batch 8: forget 5 x 8 + 2, retain 3 x 8 + 2
    batches, plan = schedule_batches(ctx, "passes", epochs=2)
    assert plan.steps_per_epoch == 6 + 4
    sizes = [len(b.indices) for b in batches[:10]]
    assert sizes == [8] * 5 + [2] + [8] * 3 + [2]
    assert sorted(torch.cat([b.indices for b in batches[:6]]).tolist()) == list(range(42))  # every forget image once
    dropped = PassSchedule(rl_passes(ctx, "passes"), 8, 0, drop_last=True)
    assert dropped.steps_per_epoch == 5 + 3
    assert {len(dropped.batch(s, step_generator(0, s, 0, torch.device("cpu"))).indices) for s in range(16)} == {8}
    assert EpochSampler(5, 8, seed=0, drop_last=True).steps_per_epoch == 1  # a set smaller than a batch is still seen


def test_unlearning_recipe_is_the_references(tmp_path):
    """SGD at a constant lr (no warmup, no decay within the 10 epochs), the reference's batch 256, no drop_last."""
    assert ClassificationConfig().unlearn.batch_size == 256 and ClassificationConfig().unlearn.drop_last is False
    ctx, _ = labelled_context(tmp_path)
    r = ctx.recipe(10, 0.013)
    assert (r.schedule, r.warmup_epochs, r.lr, r.momentum, r.weight_decay, r.drop_last) == ("constant", 0, 0.013, 0.9, 5e-4, False)


@pytest.mark.parametrize("name", ["rl", "salun"])
def test_forget_and_retain_passes_run_in_train_mode(tmp_path, name):
    """As the reference (model.train() before both loaders): BatchNorm normalizes by the batch and updates its statistics."""
    ctx, model = labelled_context(tmp_path, **{f"unlearn.{name}.epochs": 1})
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    before = model.bn1.num_batches_tracked.item()
    get_method(name)(ctx).run(model)
    steps = 5 + 3
    assert modes[-steps:] == [True] * steps
    assert model.bn1.num_batches_tracked.item() - before == steps


def test_label_smoothing_trains_the_original_and_retrain_only(tmp_path, monkeypatch):
    """``train/retrain.label_smoothing`` (fast recipes) never reaches an unlearning method: those keep the reference's plain CE."""
    smoothing: list[float] = []
    original_ce = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing", 0.0))
        return original_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    ctx, model = labelled_context(tmp_path / "retrain", **{"retrain.label_smoothing": 0.1, "retrain.epochs": 1})
    get_method("retrain")(ctx).run(model)
    assert smoothing and set(smoothing) == {0.1}
    for name in ("ft", "rl"):
        smoothing.clear()
        opts = {"train.label_smoothing": 0.1, "retrain.label_smoothing": 0.1, f"unlearn.{name}.epochs": 1}
        ctx, model = labelled_context(tmp_path / name, **opts)
        get_method(name)(ctx).run(model)
        assert smoothing and set(smoothing) == {0.0}
    with pytest.raises(ErasureError, match="label_smoothing must lie in"):
        load_config(None, ["train.label_smoothing=1.0"], schema=ClassificationConfig)
    with pytest.raises(ErasureError, match="warmup_epochs=30 must lie in"):
        load_config(None, ["retrain.warmup_epochs=30"], schema=ClassificationConfig)


def test_rl_resumes_bit_identically_after_an_interruption(tmp_path, monkeypatch):
    """Labels come from the loop's per-step generator, so an interrupted RL run resumes onto the same trajectory."""
    ctx, model = labelled_context(tmp_path / "straight", **{"unlearn.rl.epochs": 2})
    straight = get_method("rl")(ctx).run(model).state_dict()

    ctx, model = labelled_context(tmp_path / "resumed", **{"unlearn.rl.epochs": 2})
    original_ce, calls = F.cross_entropy, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # mid-epoch, in the retain pass: what Ctrl-C or a cluster's SIGTERM does
            os.kill(os.getpid(), signal.SIGINT)
        return original_ce(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupt)
    with pytest.raises(KeyboardInterrupt):
        get_method("rl")(ctx).run(model)
    assert '"step": 6' in (tmp_path / "resumed" / "checkpoint" / "state.json").read_text()
    monkeypatch.setattr(F, "cross_entropy", original_ce)
    ctx, model = labelled_context(tmp_path / "resumed", **{"unlearn.rl.epochs": 2})
    resumed = get_method("rl")(ctx).run(model).state_dict()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


# ----------------------------------------------------------------------------- mask constraint


def test_mask_constraint_restores_weights_and_zeroes_their_momentum():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    mask = Mask.random(model, 0.5, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    constraint = MaskConstraint(model, mask)
    for _ in range(5):
        F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 3, (16,))).backward()
        optimizer.step()
        optimizer.zero_grad()
        constraint.enforce(optimizer)
    for n, p in model.named_parameters():
        keep = mask.tensors[n]
        assert torch.equal(p.detach()[~keep], before[n][~keep]), n  # bit-exact, weight decay included
        buf = optimizer.state[p]["momentum_buffer"]
        assert not buf[~keep].any(), n  # momentum of masked-out weights: zero
        assert buf[keep].any() and not torch.equal(p.detach()[keep], before[n][keep]), n


def test_loop_zeroes_momentum_of_masked_out_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    mask = Mask.random(model, 0.3, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step_loss(model, g, step):
        return model(torch.randn(32, 4, generator=g, device=g.device)).pow(2).mean(), {}

    settings = LoopSettings(steps=6, lr=0.05, grad_clip=None, weight_decay=0.1, optimizer="sgd", momentum=0.9, checkpoint_every=4)
    out, _ = train(model, step_loss, settings, tmp_path, make_accelerator(DEVICE), constraint_mask=mask, fingerprint="m")
    state = load_checkpoint(tmp_path / "checkpoint")  # written at step 4, kept by the loop
    names = [n for n, _ in out.named_parameters()]
    for i, n in enumerate(names):
        keep = mask.tensors[n]
        assert not state["optimizer"]["state"][i]["momentum_buffer"][~keep].any(), n
        assert torch.equal(out.state_dict()[n].cpu()[~keep], before[n][~keep]), n


def test_gradient_mask_mode_lets_weight_decay_shrink_masked_out_weights(tmp_path):
    """mask_mode=gradient, the reference's earlier RL.py: no loss gradient reaches masked-out weights,
    but SGD's weight decay (through momentum) shrinks them, all by the same factor."""
    ctx, model = labelled_context(tmp_path, **{"unlearn.salun.epochs": 2, "unlearn.salun.mask_mode": "gradient"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = get_method("salun")(ctx).run(model)
    mask = Mask.load(tmp_path / "mask.safetensors")
    ratios = []
    for n, p in out.named_parameters():
        frozen, kept, p = ~mask.tensors[n], mask.tensors[n], p.detach().cpu()
        if not frozen.any() or not kept.any():  # the threshold is global: some tensors are all in or all out
            continue
        old, new = before[n][frozen], p[frozen]
        assert torch.equal(new[old == 0], old[old == 0]), n  # no gradient: a zero (e.g. a BatchNorm bias) stays zero
        if not (old != 0).any():
            continue
        assert not torch.equal(new, old), n  # moved, unlike the hard mode
        ratios.append(new[old != 0] / old[old != 0])
        assert not torch.allclose(p[kept], before[n][kept] * ratios[-1].mean()), n  # the trained ones follow the loss
    ratios = torch.cat(ratios)
    assert 0.99 < ratios.min() and ratios.max() < 1.0 and ratios.max() - ratios.min() < 1e-5  # one decay factor for all

    # The default (hard) holds them bit for bit.
    ctx, model = labelled_context(tmp_path / "hard", **{"unlearn.salun.epochs": 2})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = get_method("salun")(ctx).run(model)
    mask = Mask.load(tmp_path / "hard" / "mask.safetensors")
    assert all(torch.equal(p.detach().cpu()[~mask.tensors[n]], before[n][~mask.tensors[n]]) for n, p in out.named_parameters())


# ----------------------------------------------------------------------------- l1, IU, MIA


def test_l1_gamma_decays_linearly_per_epoch_as_in_the_reference():
    assert [l1_gamma(1.0, e, 10) for e in range(10)] == pytest.approx([1 - e / 10 for e in range(10)])  # last epoch: gamma / E
    assert [l1_gamma(2.0, e, 5, no_l1_epochs=2) for e in range(5)] == pytest.approx([2.0, 2 * 2 / 3, 2 / 3, 0.0, 0.0])


def test_l1_method_trains_with_the_scheduled_gamma(tmp_path):
    ctx, model = labelled_context(tmp_path, **{"unlearn.l1.epochs": 3, "unlearn.l1.gamma": 1e-3})
    get_method("l1")(ctx).run(model)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    spe = 3  # 24 retain images, batch 8
    assert len(rows) == 3 * spe
    for row in rows:
        assert float(row["gamma"]) == pytest.approx(l1_gamma(1e-3, int(row["step"]) // spe, 3))


def test_iu_reference_recursion_and_exact_woodbury():
    g = torch.Generator().manual_seed(0)
    v, G = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    # The reference recursion only ever subtracts multiples of the first gradient from v.
    k = woodfisher_reference(v, iter(G), n=3)
    diff = k - v
    assert torch.allclose(diff, (diff @ G[0]) / (G[0] @ G[0]) * G[0], atol=1e-10) and diff.abs().max() > 1e-6
    # The second gradient's update, written out.
    t = G[0] @ G[1]
    assert torch.allclose(woodfisher_reference(v, iter(G[:2]), n=3), v - (v @ G[1]) / (3 + t) * G[0])
    # It reads at most n + 2 gradients.
    assert torch.equal(woodfisher_reference(v, iter(G), n=2), woodfisher_reference(v, iter(G[:4]), n=2))
    # Woodbury: the exact inverse of lambda I + G^T G / N.
    fisher = 0.5 * torch.eye(7, dtype=torch.float64) + G.T @ G / 5
    assert torch.allclose(woodbury_solve(v.float(), G.float(), 0.5).double(), torch.linalg.solve(fisher, v), atol=1e-4)


def test_iu_solvers_run(tmp_path):
    for solver in ("reference", "woodbury"):
        ctx, model = labelled_context(tmp_path / solver, **{"unlearn.iu.solver": solver, "unlearn.iu.alpha": 1.0})
        method = get_method("iu")(ctx)
        method.run(model)
        assert method.info["iu_solver"] == solver and method.info["iu_step_norm"] > 0
    ctx, model = labelled_context(tmp_path / "bad", **{"unlearn.iu.damping": 0.5})
    with pytest.raises(ErasureError, match="lambda = 1"):
        get_method("iu")(ctx).run(model)


def test_iu_takes_its_gradients_on_augmented_images_and_the_first_retain_samples_as_the_reference(tmp_path, monkeypatch):
    """The reference's IU runs while its loaders apply the training transform, and reads its retain set in order."""
    from erasure.classification.methods import iu

    original, calls = iu._flat_grad, []

    def record(model, params, x, y, g):
        calls.append((x.clone(), g is not None))
        return original(model, params, x, y, g)

    monkeypatch.setattr(iu, "_flat_grad", record)
    steps = {}
    for name, opts in {"ref": {}, "plain": {"unlearn.iu.augment": "false"}, "random": {"unlearn.iu.sample_order": "random"}}.items():
        calls.clear()
        ctx, model = labelled_context(tmp_path / name, **{"unlearn.augment": "true", "unlearn.iu.samples": 4, **opts})
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        method = get_method("iu")(ctx)
        after = torch.nn.utils.parameters_to_vector(method.run(model).parameters()).detach()
        steps[name] = after - before
        singles = [x for x, _ in calls if len(x) == 1]
        assert len(singles) == 6  # N + 2 per-sample gradients
        assert all(augmented == (name != "plain") for _, augmented in calls) and method.info["iu_augmented"] == (name != "plain")
        in_order = all(torch.equal(x, ctx.retain_images[i : i + 1]) for i, x in enumerate(singles))
        assert in_order == (name != "random"), name
    assert not torch.allclose(steps["ref"], steps["plain"])  # crops and flips change the step
    ctx, model = labelled_context(tmp_path / "noaug", **{"unlearn.iu.samples": 4})  # unlearning without augmentation
    calls.clear()
    get_method("iu")(ctx).run(model)
    assert not any(augmented for _, augmented in calls)


class _FakeAccelerator:
    """Only what predict() uses: an autocast context in bf16, as a GPU run's accelerator gives."""

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


def test_metrics_and_mia_use_fp32_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, K))
    dtypes: list[torch.dtype] = []
    model.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, K, (20,))
    # In predict's batches of 8: a matrix product's rounding may depend on its row count (it did on a 16-core CPU).
    logits = torch.cat([model(images[i : i + 8].float().div(127.5).sub(1)) for i in range(0, 20, 8)])
    expected = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even inside a mixed-precision region
        p = predict(model, images, labels, 8, _FakeAccelerator())
    assert set(dtypes) == {torch.float32}
    assert torch.equal(p.confidence, expected.detach())
    dtypes.clear()
    predict(model, images, labels, 8, _FakeAccelerator(), autocast=True)  # the named option
    assert set(dtypes) == {torch.bfloat16}


def test_the_mia_learns_members_from_the_first_retain_images_as_the_reference(tmp_path, monkeypatch, capsys):
    """SVC_MIA's members are Subset(retain, range(len(test))); mia_members=random draws them; changing it re-scores only."""
    from sklearn import svm

    fitted = []

    class Recording(svm.SVC):
        def fit(self, x, y):
            fitted.append((torch.from_numpy(x[:, 0].copy()), torch.from_numpy(y.copy())))
            return super().fit(x, y)

    monkeypatch.setattr(svm, "SVC", Recording)
    g = torch.Generator().manual_seed(0)
    retain, test, forget = torch.rand(50, generator=g), torch.rand(20, generator=g), torch.rand(10, generator=g)
    mia_efficacy(retain, test, forget)
    x, y = fitted[-1]
    assert torch.equal(x, torch.cat([retain[:20], test]).double()) and y.tolist() == [1.0] * 20 + [0.0] * 20
    mia_efficacy(retain, test, forget, members="random")
    assert not torch.equal(fitted[-1][0][:20], x[:20]) and fitted[-1][1].tolist() == y.tolist()
    assert ClassificationConfig().mia_members == "first"

    workdir = tmp_path / "run"
    args = ["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE, "unlearn.methods=[retrain,rl]"]
    assert main(args) == 0
    stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("model.safetensors")}
    capsys.readouterr()
    assert main([*args, "mia_members=random"]) == 0
    assert "->" not in capsys.readouterr().out  # nothing trained or unlearned again
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("model.safetensors")} == stamps
    for stage in ("original", "retrain", "rl"):
        assert json.loads((workdir / stage / "done.json").read_text())["mia_members"] == "random"


def test_config_defaults_are_the_reference_settings():
    u = ClassificationConfig().unlearn
    assert (u.ft.epochs, u.ft.lr) == (10, 0.01)
    assert (u.rl.epochs, u.rl.schedule) == (10, "passes")
    assert (u.ga.epochs, u.ga.lr) == (5, 1e-4)
    assert (u.salun.epochs, u.salun.lr, u.salun.ratio, u.salun.schedule, u.salun.per_layer) == (10, 0.013, 0.5, "passes", False)
    assert u.salun.mask_mode == "hard"  # the reference's current RL.py; "gradient" is its earlier, named
    assert (u.l1.epochs, u.l1.lr, u.l1.no_l1_epochs) == (10, 0.01, 0)
    assert (u.iu.solver, u.iu.samples, u.iu.damping, u.iu.damping_scale) == ("reference", 1000, 1.0, "absolute")
    assert ClassificationConfig().eval_precision == "fp32"
    assert ClassificationConfig().mixed_precision == "no"  # the reference trains and unlearns in fp32


@pytest.mark.parametrize("path", ["cifar10_random10", "cifar10_random50", "cifar10_class"])
def test_setting_configs_follow_the_reference(path):
    c = load_config(f"configs/classification/{path}.yaml", schema=ClassificationConfig)
    assert c.split.val_size == 5000 and c.model.width == 64
    assert (c.train.epochs, c.train.lr, c.train.batch_size, c.train.milestones, c.train.schedule) == (182, 0.1, 256, [91, 136], "multistep")
    assert (c.retrain.epochs, c.retrain.lr, c.retrain.schedule) == (160, 0.1, "multistep")
    assert c.unlearn.rl.schedule == c.unlearn.salun.schedule == "passes" and c.eval_precision == "fp32"
    assert c.mixed_precision == "no"
    assert (c.unlearn.salun.epochs, c.unlearn.salun.lr, c.unlearn.salun.ratio) == (10, 0.013, 0.5)
    assert (c.unlearn.ft.epochs, c.unlearn.ft.lr, c.unlearn.ga.epochs) == (10, 0.01, 5)
    forget = (c.forget.kind, c.forget.fraction if c.forget.kind == "random" else c.forget.class_index)
    assert forget == {"cifar10_random10": ("random", 0.1), "cifar10_random50": ("random", 0.5), "cifar10_class": ("class", 0)}[path]


def test_fast_config_changes_only_the_training_recipe():
    """The fast config speeds up the original model and Retrain; the split and every unlearning setting are the reference config's."""
    fast = load_config("configs/classification/cifar10_random10_fast.yaml", schema=ClassificationConfig)
    ref = load_config("configs/classification/cifar10_random10.yaml", schema=ClassificationConfig)
    same = ("split", "forget", "model", "unlearn", "eval_precision")
    assert all(getattr(fast, key) == getattr(ref, key) for key in same)
    for recipe in (fast.train, fast.retrain):
        assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.schedule, recipe.warmup_epochs) == (80, 512, 0.4, "cosine", 16)
        assert (recipe.label_smoothing, recipe.augment, recipe.weight_decay, recipe.momentum) == (0.1, True, 5e-4, 0.9)
    assert ref.train.label_smoothing == ref.retrain.label_smoothing == 0.0  # the reference recipe has none
    assert (fast.mixed_precision, ref.mixed_precision) == ("auto", "no")  # bf16 on a GPU: the fast config's named speed-up


@pytest.mark.parametrize("setting", ["random50", "class"])
def test_fast_variants_are_the_reference_setting_with_the_fast_recipe(setting):
    """cifar10_{setting}_fast.yaml = cifar10_random10_fast.yaml (via ``base``) with the reference setting's forget set."""
    fast = load_config(f"configs/classification/cifar10_{setting}_fast.yaml", schema=ClassificationConfig)
    ref = load_config(f"configs/classification/cifar10_{setting}.yaml", schema=ClassificationConfig)
    random10 = load_config("configs/classification/cifar10_random10_fast.yaml", schema=ClassificationConfig)
    assert fast.forget == ref.forget and fast.workdir.endswith(f"cifar10_{setting}_fast")
    assert all(getattr(fast, key) == getattr(random10, key) for key in ("data", "split", "model", "train", "retrain", "unlearn"))


# ----------------------------------------------------------------------------- sweeps


def test_sweep_grid_parsing_and_points():
    assert parse_grid(["unlearn.salun.lr=0.005,0.01", "unlearn.salun.ratio=0.3,0.5"]) == [
        ("unlearn.salun.lr", ["0.005", "0.01"]),
        ("unlearn.salun.ratio", ["0.3", "0.5"]),
    ]
    config = load_config(None, ["sweep.grid=['unlearn.salun.lr=0.005,0.01','unlearn.ga.lr=1e-4,1e-3']"], schema=ClassificationConfig)
    points = grid_points(config)
    assert [label for label, _ in points] == [
        "salun.lr=0.005,ga.lr=1e-4",
        "salun.lr=0.005,ga.lr=1e-3",
        "salun.lr=0.01,ga.lr=1e-4",
        "salun.lr=0.01,ga.lr=1e-3",
    ]
    assert [(p.unlearn.salun.lr, p.unlearn.ga.lr) for _, p in points] == [(0.005, 1e-4), (0.005, 1e-3), (0.01, 1e-4), (0.01, 1e-3)]
    assert swept_methods(config) == ["ga", "salun"]
    common = load_config(None, ["sweep.grid=['unlearn.batch_size=8,16']"], schema=ClassificationConfig)
    assert swept_methods(common) == ["ft", "rl", "ga", "iu", "l1", "salun"]
    for bad, message in [
        ("train.lr=0.1,0.2", "not an unlearning setting"),
        ("unlearn.methods=ft", "not an unlearning setting"),
        ("unlearn.sallun.lr=0.1", "unknown classification-unlearning method"),
        ("unlearn.salun.lr", "key=v1,v2"),
        ("unlearn.salun.lrr=0.1", "unknown config key 'unlearn.salun.lrr'"),
    ]:
        with pytest.raises(ErasureError, match=message):
            load_config(None, [f"sweep.grid=['{bad}']"], schema=ClassificationConfig)


def test_select_takes_the_smallest_average_gap_first_on_ties():
    rows = [
        {"method": "a", "base_method": "salun", "point": "p1", "avg_gap": 2.0},
        {"method": "b", "base_method": "salun", "point": "p2", "avg_gap": 1.0},
        {"method": "c", "base_method": "salun", "point": "p3", "avg_gap": 1.0},
        {"method": "retrain", "avg_gap": 0.0},
    ]
    assert select(rows)["salun"]["point"] == "p2"


def test_cli_sweep_runs_resumably_and_writes_the_table(tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE, "unlearn.methods=[retrain,salun]"]
    assert main([*args, "--sweep", "unlearn.salun.lr=0.005,0.02"]) == 0
    out = capsys.readouterr().out
    report = json.loads((workdir / "sweep.json").read_text())
    methods = [row["method"] for row in report["table"]]
    assert methods == ["original", "retrain", "salun [salun.lr=0.005]", "salun [salun.lr=0.02]"]
    runs = report["table"][2:]
    best = min(runs, key=lambda r: r["avg_gap"])
    assert report["selected"] == {"salun": {"point": best["point"], "avg_gap": best["avg_gap"]}}
    assert all((workdir / "sweep" / r["point"] / "salun" / "mask.safetensors").is_file() for r in runs)
    md = (workdir / "sweep.md").read_text()
    assert "smallest average gap to Retrain" in md and md in out

    # A rerun reuses every run; the same grid given in the config is the same sweep.
    stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("model.safetensors")}
    assert main([*args, "sweep.grid=['unlearn.salun.lr=0.005,0.02']"]) == 0
    assert "unlearning ->" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("model.safetensors")} == stamps
    # Extending the grid runs only the new point.
    assert main([*args, "--sweep", "unlearn.salun.lr=0.005,0.02,0.01"]) == 0
    out = capsys.readouterr().out
    assert out.count("unlearning ->") == 1 and "salun.lr=0.01/salun] unlearning" in out


def test_a_sweep_cut_short_keeps_the_points_it_finished(tmp_path, monkeypatch):
    """A time limit that stops a sweep mid-grid leaves sweep.json / sweep.md with every finished point."""
    from erasure.classification.pipeline import Experiment

    overrides = [*TINY_TABLE, f"workdir={tmp_path / 'run'}", "unlearn.methods=[retrain,salun]"]
    config = load_config(None, [*overrides, "sweep.grid=['unlearn.salun.lr=0.005,0.02,0.01']"], schema=ClassificationConfig)
    run_method = Experiment.run_method

    def stopped_at_the_third_point(self, point, name, root=None):
        if root is not None and Path(root).name == "salun.lr=0.01":
            raise KeyboardInterrupt  # as `timeout` or Ctrl-C would stop it
        return run_method(self, point, name, root)

    monkeypatch.setattr(Experiment, "run_method", stopped_at_the_third_point)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, on_point=lambda report: seen.append((report["points_done"], len(report["table"]))))
    assert seen == [(1, 3), (2, 4)]  # original, retrain, then one row per finished point
    report = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert (report["points_done"], report["points"]) == (2, 3)
    assert [row["point"] for row in report["table"][2:]] == ["salun.lr=0.005", "salun.lr=0.02"]
    assert "salun.lr=0.02" in (tmp_path / "run" / "sweep.md").read_text()


def test_a_grid_over_two_methods_runs_each_method_once_per_setting_of_its_own(tmp_path, capsys):
    """salun.lr x rl.lr is 4 points but 2 + 2 runs: a method's run reads only its own keys (and the common ones)."""
    assert own_label("salun.lr=0.01,rl.lr=0.1,batch_size=8", "rl") == "rl.lr=0.1,batch_size=8"
    workdir = tmp_path / "run"
    args = ["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE, "unlearn.methods=[retrain,rl,salun]"]
    assert main([*args, "--sweep", "unlearn.salun.lr=0.005,0.02", "--sweep", "unlearn.rl.lr=0.01,0.03"]) == 0
    out = capsys.readouterr().out
    report = json.loads((workdir / "sweep.json").read_text())
    assert (report["points_done"], report["points"]) == (4, 4)
    runs = [(row["base_method"], row["point"]) for row in report["table"][2:]]
    assert runs == [("rl", "rl.lr=0.01"), ("salun", "salun.lr=0.005"), ("rl", "rl.lr=0.03"), ("salun", "salun.lr=0.02")]
    assert out.count("salun] unlearning ->") == 2 and out.count("rl] unlearning ->") == 2
    # rl.lr=0.01 is the config's own setting: the table's folder holds that run, and the table reuses it
    assert sorted(p.parent.parent.name for p in (workdir / "sweep").glob("*/*/model.safetensors")) == sorted(p for _, p in runs[1:])
    assert (workdir / "rl" / "model.safetensors").is_file() and not (workdir / "sweep" / "rl.lr=0.01").exists()
    assert main(args) == 0
    assert "rl] unlearning ->" not in capsys.readouterr().out
    assert set(report["selected"]) == {"rl", "salun"}


def test_trials_rerun_retrain_and_every_method_with_raised_seeds_and_report_mean_and_spread(tmp_path, capsys):
    """Trial 0 is the table (reused); trial k reruns Retrain and the methods at seed + k on the same original model."""
    workdir = tmp_path / "run"
    args = ["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE, "unlearn.methods=[retrain,rl]"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("unlearning ->") == 4 and "[seed+2/retrain] unlearning" in out and "[retrain] unlearning" not in out
    report = json.loads((workdir / "trials.json").read_text())
    assert (report["trials"], report["trials_done"], len(report["tables"])) == (3, 3, 3)
    for k in (1, 2):
        settings = (workdir / "trials" / f"seed+{k}" / "rl" / "config.yaml").read_text()
        assert f"seed: {k}" in settings.split("unlearn:")[1] and f"seed: {k}" in settings.split("retrain:")[1].split("unlearn:")[0]
    retrains = [load_tensors(folder / "retrain" / "model.safetensors") for folder in (workdir, workdir / "trials" / "seed+1")]
    assert any(not torch.equal(retrains[0][n], retrains[1][n]) for n in retrains[0])  # another Retrain, not a copy
    rl = [next(r for r in table if r["method"] == "rl") for table in report["tables"]]
    gaps = [r["avg_gap"] for r in rl]
    assert report["summary"]["rl"]["avg_gap"] == {"mean": statistics.fmean(gaps), "std": statistics.stdev(gaps)}
    assert report["summary"]["original"]["TA"]["std"] == 0  # one original model
    md = (workdir / "trials.md").read_text()
    assert md in out and "| rl |" in md and " ± " in md

    # A rerun reuses every run; one more trial runs only its own.
    stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("model.safetensors")}
    assert main([*args, "--trials", "3"]) == 0
    assert "unlearning ->" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("model.safetensors")} == stamps
    assert main([*args, "--trials", "4"]) == 0
    assert capsys.readouterr().out.count("unlearning ->") == 2
    for bad, message in [(["--trials", "0"], "at least 1"), (["--trials", "2", "--sweep", "unlearn.rl.lr=0.02"], "two different runs")]:
        assert main([*args, *bad]) == 2
        assert message in capsys.readouterr().err


def test_salun_mask_sees_the_training_augmentation_as_the_reference(tmp_path):
    """The reference's forget loader applies the training transform to the mask pass; mask_augment=false opts out."""
    from erasure.classification.methods.salun import SalUn

    masks = {}
    for name, opts in {"ref": {}, "plain": {"unlearn.salun.mask_augment": "false"}, "noaug": {"unlearn.augment": "false"}}.items():
        ctx, model = tiny_context(tmp_path / name, **opts)
        masks[name] = SalUn(ctx).make_mask(model)
    assert masks["ref"].info["augmented"] and not masks["plain"].info["augmented"] and not masks["noaug"].info["augmented"]
    differs = any(not torch.equal(masks["ref"].tensors[n], masks["plain"].tensors[n]) for n in masks["ref"].tensors)
    assert differs  # crops and flips change which weights are most salient
    assert all(torch.equal(masks["plain"].tensors[n], masks["noaug"].tensors[n]) for n in masks["plain"].tensors)


def test_salun_mask_batches_come_from_a_shuffle_of_the_forget_set_as_the_reference(tmp_path, monkeypatch):
    """The reference's mask pass reads a shuffled forget loader: every image once, not in index order."""
    from erasure.classification.methods import salun

    seen = []
    original = salun.accumulate_gradients

    def record(model, loss, batches, **kwargs):
        seen.extend(batches)
        return original(model, loss, batches, **kwargs)

    monkeypatch.setattr(salun, "accumulate_gradients", record)
    ctx, model = labelled_context(tmp_path, n_forget=40)
    ctx.forget_images = torch.randint(0, 256, (40, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    salun.SalUn(ctx).make_mask(model)
    assert [len(y) for _, y in seen] == [8] * 5  # unlearn.batch_size
    rows = [next(i for i in range(40) if torch.equal(ctx.forget_images[i], x)) for images, _ in seen for x in images]
    assert sorted(rows) == list(range(40)) and rows != list(range(40))  # every image once, shuffled


def test_a_sweep_point_is_checked_like_a_loaded_config():
    """A grid value out of range is refused by the same rules as an override, when the config loads."""
    with pytest.raises(ErasureError, match="'unlearn.salun.lr' is -1.0; it must be > 0"):
        load_config(None, ["sweep.grid=['unlearn.salun.lr=0.01,-1']"], schema=ClassificationConfig)


def test_inputs_are_normalized_per_channel_as_the_reference_model_does():
    """CIFAR-10 pixels p in [0, 1] reach conv1 as (p - mean) / std with the reference's statistics; the state dict is unchanged."""
    from erasure.classification.config import ClassificationConfig
    from erasure.classification.model import CHANNEL_STATS
    from erasure.classification.train import build_model
    from erasure.core.config import load_config

    assert ClassificationConfig().model.input_norm == "reference"
    assert CHANNEL_STATS["cifar10"] == ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])  # setup_model_dataset
    config = load_config(None, ["data.name=cifar10", "model.width=4"], schema=ClassificationConfig)
    model = build_model(config, 3, 10, seed=0).eval()
    plain = build_model(
        load_config(None, ["data.name=cifar10", "model.width=4", "model.input_norm=symmetric"], schema=ClassificationConfig), 3, 10, seed=0
    ).eval()
    assert model.state_dict().keys() == plain.state_dict().keys()
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(pixels * 2 - 1)  # to_input's range
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CHANNEL_STATS["cifar10"])
    torch.testing.assert_close(seen[0], (pixels - mean) / std)
    seen.clear()
    plain.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        plain(pixels * 2 - 1)
    torch.testing.assert_close(seen[0], pixels * 2 - 1)  # symmetric: [-1, 1] as given
    digits = load_config(None, ["data.name=digits", "model.width=4"], schema=ClassificationConfig)
    assert not hasattr(build_model(digits, 1, 10, seed=0), "input_scale")  # no reference statistics: [-1, 1]


def test_a_salun_classification_step_never_waits_for_the_gpu():
    """Batch drawing (indices, random labels, crops, flips), forward, backward, SGD with weight decay
    and the mask's restore: no host synchronisation inside a step (on CUDA, sync debug mode raises at
    any), so the host queues the next step while the GPU runs this one. On a CPU the steps just run."""
    from erasure.classification.data import to_input
    from erasure.classification.methods.rl import uniform_labels
    from erasure.classification.train import Pass
    from erasure.core.saliency import Mask, MaskConstraint

    device = torch.device(DEVICE)
    torch.manual_seed(0)
    model = resnet18(10, width=4, channel_stats=([0.5] * 3, [0.25] * 3)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (64,), device=device)
    passes = [Pass(images[:32], labels[:32], relabel=uniform_labels(10), name="forget"), Pass(images[32:], labels[32:], name="retain")]
    schedule = PassSchedule(passes, batch_size=8, seed=0, augment_images=True)
    mask = Mask.random(model, 0.5)  # the mask SalUn would use, as far as the step's work goes
    constraint = MaskConstraint(model, mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(i: int) -> torch.Tensor:
        b = schedule.batch(i, torch.Generator(device).manual_seed(i))
        loss = F.cross_entropy(model(to_input(b.images)), b.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        constraint.enforce(optimizer)
        return loss

    step(0)  # the epoch's permutations move to the device once (a copy that waits); cuDNN picks its kernels
    step(4)
    with no_host_sync():
        losses = [step(i) for i in (1, 2, 5, 6)]  # both passes: relabelled forget batches, then retain ones
    assert all(torch.isfinite(loss.detach()) for loss in losses)
