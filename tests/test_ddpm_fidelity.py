"""The DDPM path's reference recipe, key by key: mask pass and loss, EMA, dropout, attention, flips,
lr schedule, GA's alpha, FID sets, and the stage each key fingerprints (SalUn DDPM/, OPTML-Group/Unlearn-Saliency)."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D

from erasure.core.data import random_flip
from erasure.core.errors import ErasureError
from erasure.core.loop import LoopSettings, Monitor, make_accelerator, train
from erasure.ddpm import methods as ddpm_methods
from erasure.ddpm.config import Config, ModelConfig, SampleConfig, UnlearnConfig, load
from erasure.ddpm.methods import EraseContext, get_method
from erasure.ddpm.model import build_unet, noise_scheduler
from tests.conftest import DEVICE

ROOT = Path(__file__).resolve().parents[1]
NULL = 10


def context(n_forget: int = 50, flip: bool = False, **unlearn) -> EraseContext:
    g = torch.Generator().manual_seed(0)
    # Images no flip leaves unchanged (a ramp along the width), so a flipped one is recognisable.
    ramp = torch.linspace(-1, 1, 8).expand(1, 8, 8)
    forget = ramp + 0.01 * torch.arange(n_forget, dtype=torch.float32).view(-1, 1, 1, 1)
    return EraseContext(
        config=UnlearnConfig(batch_size=16, **unlearn),
        sample=SampleConfig(steps=4),
        scheduler=noise_scheduler(),
        forget_images=forget,
        retain_images=ramp + 0.01 * torch.randn(60, 1, 8, 8, generator=g),
        retain_labels=torch.randint(1, 10, (60,), generator=g),
        forget_class=0,
        target_class=1,
        null_class=NULL,
        random_flip=flip,
    )


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_unet(ModelConfig(channels=[8, 16], layers_per_block=1, norm_groups=4), (1, 8, 8), 10)


def record_x0(monkeypatch, module) -> list[torch.Tensor]:
    """The clean batches a method noises (its ``add_noise`` calls), recorded."""
    seen: list[torch.Tensor] = []
    original = module.add_noise

    def spy(scheduler, x0, g, antithetic=True):
        seen.append(x0.detach().clone())
        return original(scheduler, x0, g, antithetic)

    monkeypatch.setattr(module, "add_noise", spy)
    return seen


def mask_config(ctx: EraseContext, **mask) -> EraseContext:
    return dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, mask=dataclasses.replace(ctx.config.mask, **mask)))


# ----------------------------------------------------------------------------- F8: the mask's pass


def test_mask_is_one_shuffled_pass_over_the_forget_set_by_default(monkeypatch):
    """Every forget image once, in a seeded random order, the last batch holding the rest (the reference's loader)."""
    from erasure.ddpm.methods import salun

    assert UnlearnConfig().mask.batches is None
    seen = record_x0(monkeypatch, salun)
    ctx = mask_config(context(), batch_size=16)
    mask = get_method("salun")(ctx).make_mask(tiny_unet())
    assert [len(b) for b in seen] == [16, 16, 16, 2]
    ids = torch.cat(seen)[:, 0, 0, 0].sub(-1).div(0.01).round().long()  # image i has offset 0.01 i
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))  # each once, shuffled
    assert mask.info["batches"] == 4 and mask.info["batch_order"] == "one-pass"
    seen.clear()
    get_method("salun")(ctx).make_mask(tiny_unet())
    assert torch.equal(torch.cat(seen)[:, 0, 0, 0].sub(-1).div(0.01).round().long(), ids)  # seeded


def test_mask_batches_n_draws_n_full_batches_with_replacement(monkeypatch):
    from erasure.ddpm.methods import salun

    seen = record_x0(monkeypatch, salun)
    mask = get_method("salun")(mask_config(context(), batches=6, batch_size=16)).make_mask(tiny_unet())
    assert [len(b) for b in seen] == [16] * 6 and mask.info["batch_order"] == "random"
    ids = torch.cat(seen)[:, 0, 0, 0].sub(-1).div(0.01).round().long()
    assert len(set(ids.tolist())) < 96  # with replacement: 96 draws from 50 images repeat some


# ----------------------------------------------------------------------------- F9: the mask's loss


def test_mask_loss_is_summed_over_pixels_and_averaged_over_the_batch(monkeypatch):
    """loss_reduction=sum (default) is C*H*W times the per-element mean on the same batches and noise,
    so each batch's clip to norm 1 meets the reference's gradient scale."""
    from erasure.ddpm.methods import salun

    assert UnlearnConfig().mask.loss_reduction == "sum"
    losses: dict[str, list[float]] = {}
    real = salun.accumulate_gradients

    for reduction in ("sum", "mean"):

        def spy(model, loss_fn, batches, clip_norm=None, progress=True, _r=reduction):
            losses[_r] = []

            def recorded(m, b):
                loss = loss_fn(m, b)
                losses[_r].append(loss.item())
                return loss

            return real(model, recorded, batches, clip_norm, progress)

        monkeypatch.setattr(salun, "accumulate_gradients", spy)
        get_method("salun")(mask_config(context(), loss_reduction=reduction, batch_size=16)).make_mask(tiny_unet())
    assert len(losses["sum"]) == 4
    assert losses["sum"] == pytest.approx([64 * v for v in losses["mean"]], rel=1e-4)  # 1 x 8 x 8 pixels


def test_mask_batches_are_clipped_to_unit_norm_under_the_sum():
    """With the summed loss every batch's gradient exceeds norm 1, so the clipped sum of B batches has norm <= B."""
    from erasure.core.saliency import accumulate_gradients

    unet = tiny_unet()
    ctx = context()
    x0 = ctx.forget_images[:16]
    x_t, noise, t = ddpm_methods.salun.add_noise(ctx.scheduler, x0, torch.Generator().manual_seed(0))

    def loss(m, _):
        return (m(x_t, t, class_labels=torch.zeros(16, dtype=torch.long)).sample - noise).square().flatten(1).sum(1).mean()

    raw = accumulate_gradients(unet, loss, range(1), progress=False)
    assert torch.cat([g.flatten() for g in raw.values()]).norm() > 1
    clipped = accumulate_gradients(unet, loss, range(3), clip_norm=1.0, progress=False)
    assert torch.cat([g.flatten() for g in clipped.values()]).norm() == pytest.approx(3.0, rel=1e-4)


# ----------------------------------------------------------------------------- F6: EMA


class Weights(Monitor):
    def __init__(self) -> None:
        self.after: list[torch.Tensor] = []

    def after_step(self, model, step):
        self.after.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().to("cpu", copy=True))  # beside `start`


def ema_run(tmp_path: Path, warmup: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    def step_loss(m, g, step):
        x = torch.randn(8, 3, generator=g, device=g.device)
        return m(x).square().mean(), {}

    watch = Weights()
    settings = LoopSettings(steps=5, lr=0.1, ema_decay=0.9, ema_warmup=warmup)
    _, ema = train(model, step_loss, settings, tmp_path / str(warmup), make_accelerator(DEVICE), monitor=watch)
    return start, watch.after, torch.cat([s.flatten() for s in ema.shadow_params]).cpu()


def test_ema_decay_is_constant_from_the_first_step_as_the_reference(tmp_path):
    """ema_warmup=false: shadow_0 = initial weights, shadow_k = d shadow + (1 - d) w_k (EMAHelper, mu = d)."""
    # The demo keeps diffusers' ramp (its 600 steps are too few for a constant average); the CIFAR-10 configs set false.
    assert Config().train.ema_warmup is True and LoopSettings(steps=1, lr=1.0).ema_warmup is True
    start, after, shadow = ema_run(tmp_path, warmup=False)
    expected = start
    for w in after:
        expected = 0.9 * expected + 0.1 * w
    assert torch.allclose(shadow, expected.cpu(), atol=1e-6)
    # diffusers' ramp (ema_warmup=true) copies the weights at its first update, then averages with (1 + s)/(10 + s).
    start, after, shadow = ema_run(tmp_path, warmup=True)
    expected = after[0]
    for s, w in enumerate(after[1:], start=1):
        d = min(0.9, (1 + s) / (10 + s))
        expected = d * expected + (1 - d) * w
    assert torch.allclose(shadow, expected.cpu(), atol=1e-6)


# ----------------------------------------------------------------------------- F1, F2: the UNet


def test_dropout_and_attention_layout_reach_the_unet():
    cfg = ModelConfig(channels=[16, 32, 32], layers_per_block=1, attention=True, norm_groups=8, dropout=0.1)
    reference = dataclasses.replace(cfg, attention_resolutions=[16], attention_head_dim=None)
    unet = build_unet(reference, (3, 32, 32), 10)
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")  # up block 1 works at 16 px
    attentions = [m for m in unet.modules() if hasattr(m, "heads")]
    assert len(attentions) == 1 + 1 + 2 and all(m.heads == 1 for m in attentions)  # down, mid, up (layers + 1): one head
    assert {m.dropout.p for m in unet.modules() if isinstance(m, ResnetBlock2D)} == {0.1}
    earlier = build_unet(cfg, (3, 32, 32), 10)  # attention_resolutions=None, head dim 8: every level but the first
    assert earlier.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert {m.heads for m in earlier.modules() if hasattr(m, "heads")} == {4}
    assert {m.dropout.p for m in build_unet(ModelConfig(), (1, 8, 8), 10).modules() if isinstance(m, ResnetBlock2D)} == {0.0}  # demo
    with pytest.raises(ErasureError, match="attention_resolutions"):
        build_unet(dataclasses.replace(reference, attention_resolutions=[12]), (3, 32, 32), 10)


def test_the_unet_keeps_the_reference_models_sinusoid_norm_eps_and_downsample_padding():
    """Conditional_Model: [sin, cos] at exp(-ln(1e4) i / (half - 1)), GroupNorm eps 1e-6, pad (0, 1, 0, 1) then a stride-2 conv."""
    from diffusers.models.downsampling import Downsample2D

    cfg = ModelConfig(channels=[16, 32], layers_per_block=1, norm_groups=8)
    assert cfg.conventions == "reference"
    unet = build_unet(cfg, (3, 8, 8), 10)
    t, half = torch.tensor([0, 7, 999]), 8  # the sinusoid spans the first level's 16 channels
    angles = t[:, None].float() * torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))[None]
    torch.testing.assert_close(unet.time_proj(t), torch.cat([angles.sin(), angles.cos()], 1))
    assert {m.eps for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    (down,) = [m for m in unet.modules() if isinstance(m, Downsample2D)]
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))

    earlier = build_unet(dataclasses.replace(cfg, conventions="diffusers"), (3, 8, 8), 10)
    c = earlier.config
    assert (c.flip_sin_to_cos, c.freq_shift, c.norm_eps, c.downsample_padding) == (True, 0, 1e-5, 1)  # diffusers' defaults


def test_cifar10_config_carries_the_reference_recipe():
    cfg = load(ROOT / "configs" / "cifar10.yaml")
    assert (cfg.model.dropout, cfg.model.attention_resolutions, cfg.model.attention_head_dim) == (0.1, [16], None)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps, cfg.train.schedule) == (800000, 2e-4, 0, "constant")
    assert (cfg.train.ema_decay, cfg.train.ema_warmup, cfg.data.random_flip) == (0.9999, False, True)
    assert cfg.unlearn.mask.batches is None and cfg.unlearn.mask.loss_reduction == "sum" and cfg.unlearn.ga_alpha == 1.0
    assert (cfg.eval.samples_per_class, cfg.eval.fid_samples_per_class, cfg.eval.fid.real_images_per_class) == (500, 5000, 500)
    assert (cfg.sample.protocol, *cfg.sample.resolved(), cfg.sample.guidance) == ("reference", 1000, 1.0, 2.0)  # sample.py
    proof = load(ROOT / "configs" / "cifar10_proof.yaml")
    assert proof.data.random_flip and proof.model.dropout == 0.1 and proof.model.attention_head_dim is None
    assert proof.train.ema_warmup is False and proof.train.schedule == "cosine"  # its short recipe, named in its header
    for name in ("mnist", "mnist16", "mnist32"):
        assert load(ROOT / "configs" / f"{name}.yaml").data.random_flip is False
    # The UA judge as train_classifier.py: ImageNet ResNet-34 (pretrained=True), Adam 1e-5 with the fc at 10x, weight
    # decay 5e-4, 10 epochs of batch 128 (tests/test_judge.py replays its steps); the configs without a reference keep the CNN.
    judge = cfg.classifier
    assert (judge.arch, judge.pretrained, judge.weights, judge.epochs, judge.batch_size) == ("resnet34", True, None, 10, 128)
    assert (judge.resolved_lr(), judge.head_lr_scale, judge.weight_decay) == (1e-5, 10.0, 5e-4)
    others = [proof, Config(), *(load(ROOT / "configs" / f"{n}.yaml") for n in ("mnist", "mnist16", "mnist32"))]
    assert all(c.classifier.arch == "cnn" for c in others)
    assert Config().data.random_flip is False and Config().train.schedule == "cosine"  # the digits demo
    # The base loss: summed over the pixels in the reference recipe, the per-element mean elsewhere.
    assert cfg.train.loss_reduction == "sum" and proof.train.loss_reduction == "mean" and Config().train.loss_reduction == "mean"
    from erasure.ddpm.model import denoising_loss

    unet = build_unet(ModelConfig(channels=[8, 16], norm_groups=4), (1, 8, 8), 10)
    x0, labels = torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4)
    mean, total = (
        denoising_loss(unet, noise_scheduler(), x0, labels, torch.Generator().manual_seed(0), reduction=r) for r in ("mean", "sum")
    )
    assert torch.allclose(total, mean * 64, rtol=1e-5)  # 1 x 8 x 8 pixels: the same draws, summed instead of averaged


# ----------------------------------------------------------------------------- F7: random flips


def test_random_flip_flips_about_half_reproducibly():
    x = torch.arange(2000 * 4, dtype=torch.float32).view(2000, 1, 1, 4)
    out = random_flip(x, torch.Generator().manual_seed(1))
    flipped = (out == x.flip(-1)).all(-1).flatten()
    assert ((out == x).all(-1).flatten() | flipped).all() and 0.45 < flipped.float().mean() < 0.55
    assert torch.equal(out, random_flip(x, torch.Generator().manual_seed(1)))


def flipped_fraction(batches: list[torch.Tensor]) -> float:
    x = torch.cat(batches)
    return (x[..., 0] > x[..., -1]).float().mean().item()  # the ramp rises left to right unless flipped


@pytest.mark.parametrize("method", ["rl", "ga"])
def test_erasure_forget_and_retain_batches_are_flipped_with_random_flip(monkeypatch, method):
    from erasure.ddpm.methods import ga, rl

    seen = record_x0(monkeypatch, {"rl": rl, "ga": ga}[method])
    if method == "ga":
        monkeypatch.setattr(rl, "add_noise", ga.add_noise)  # the retain batch (RL's helper) too
    w = torch.nn.Parameter(torch.tensor(0.5))

    def model(x_t, t, class_labels):
        return SimpleNamespace(sample=x_t * w)

    for flip in (False, True):
        seen.clear()
        m = get_method(method)(context(flip=flip))
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            m.loss(model, g)
        forget, retain = seen[0::2], seen[1::2]  # each step noises its forget batch, then its retain batch
        if flip:
            assert 0.3 < flipped_fraction(forget) < 0.7 and 0.3 < flipped_fraction(retain) < 0.7
        else:
            assert flipped_fraction(forget) == 0 and flipped_fraction(retain) == 0


def test_mask_batches_are_flipped_with_random_flip(monkeypatch):
    from erasure.ddpm.methods import salun

    seen = record_x0(monkeypatch, salun)
    get_method("salun")(context(n_forget=200, flip=True)).make_mask(tiny_unet())
    assert 0.3 < flipped_fraction(seen) < 0.7
    seen.clear()
    get_method("salun")(context(n_forget=200)).make_mask(tiny_unet())
    assert flipped_fraction(seen) == 0


def test_without_flips_the_erasure_draws_are_unchanged():
    """random_flip=false draws nothing: the batches and noise are those of the code before the option."""
    ctx = context()
    x = ctx.forget_images[:4]
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert ctx.augment(x, g) is x and torch.equal(g.get_state(), before)


# ----------------------------------------------------------------------------- F4: the lr schedule


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_base_lr_schedule(tmp_path, schedule):
    from erasure.ddpm import pipeline

    overrides = ["model.channels=[8,16]", "train.steps=12", "train.batch_size=8", f"workdir={tmp_path}", f"train.schedule={schedule}"]
    overrides += ["train.warmup_steps=0", "train.lr=1e-3", "device=cpu", "mixed_precision=no"]
    pipeline.train_base(load(None, overrides))
    rows = list(csv.DictReader((tmp_path / "ddpm" / "log.csv").open()))
    lrs = [float(r["lr"]) for r in rows]
    if schedule == "constant":
        assert lrs == [1e-3] * len(rows)  # the reference: plain Adam, no scheduler
    else:
        assert lrs[0] == 1e-3 and lrs[-1] < 1e-4


# ----------------------------------------------------------------------------- data order


def test_erasure_reads_forget_and_retain_sets_in_shuffled_passes_by_default(monkeypatch):
    """unlearn.data_order=epochs, as the reference's cycled DataLoader(shuffle=True): each pass reads every image once,
    its last batch smaller, each pass in its own order; the step picks the batch, so a resumed run continues it."""
    from erasure.ddpm.methods import rl

    ctx, g = context(n_forget=50), torch.Generator().manual_seed(0)  # batch 16: passes of 16, 16, 16, 2
    assert ctx.config.data_order == "epochs"

    def batches(c: EraseContext, which: str, steps: range) -> list[torch.Tensor]:
        out = []
        for step in steps:
            c.step = step
            out.append(c.batch(which, g))
        return out

    forget = batches(ctx, "forget", range(8))
    assert [len(b) for b in forget] == [16, 16, 16, 2] * 2
    first, second = torch.cat(forget[:4]), torch.cat(forget[4:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50)) and not torch.equal(first, second)
    retain = batches(ctx, "retain", range(4))
    assert [len(b) for b in retain] == [16, 16, 16, 12] and sorted(torch.cat(retain).tolist()) == list(range(60))
    assert torch.equal(batches(context(n_forget=50), "forget", range(5, 6))[0], forget[5])  # a fresh (resumed) context
    assert not torch.equal(batches(dataclasses.replace(context(n_forget=50), rank=1), "forget", range(1))[0], forget[0])

    seen = record_x0(monkeypatch, rl)  # RL noises exactly the step's forget batch, then its retain batch
    m = get_method("rl")(ctx)
    ctx.step = 3
    m.loss(lambda x_t, t, class_labels: SimpleNamespace(sample=x_t * 0.5), g)
    assert torch.equal(seen[0], ctx.forget_images[forget[3]]) and torch.equal(seen[1], ctx.retain_images[retain[3]])

    drawn = batches(context(n_forget=50, data_order="random"), "forget", range(4))  # our earlier default
    assert [len(b) for b in drawn] == [16] * 4


def test_base_training_reads_the_train_split_in_shuffled_passes(tmp_path, monkeypatch):
    """train.data_order=epochs: one pass of base training reads every train image exactly once."""
    from erasure.core.data import load_data, to_model_range
    from erasure.ddpm import pipeline

    seen: list[torch.Tensor] = []
    original = pipeline.denoising_loss

    def spy(unet, scheduler, x0, *args, **kwargs):
        seen.append(x0.detach().clone())
        return original(unet, scheduler, x0, *args, **kwargs)

    monkeypatch.setattr(pipeline, "denoising_loss", spy)
    config = load(None, ["model.channels=[8,16]", "train.batch_size=128", f"workdir={tmp_path}", "device=cpu", "mixed_precision=no"])
    images = to_model_range(load_data(config.data, "train").images)
    steps = math.ceil(len(images) / 128)
    pipeline.train_base(dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps)))
    read = torch.cat(seen)
    assert [len(x) for x in seen] == [128] * (steps - 1) + [len(images) - 128 * (steps - 1)]
    rows, counts = torch.unique(read.flatten(1), dim=0, return_counts=True)
    expected_rows, expected_counts = torch.unique(images.flatten(1), dim=0, return_counts=True)
    assert torch.equal(rows, expected_rows) and torch.equal(counts, expected_counts)


# ----------------------------------------------------------------------------- F10: GA's alpha


def test_ga_weighs_its_retain_loss_with_ga_alpha():
    assert UnlearnConfig().ga_alpha == 1.0  # train.py's --alpha default; both reference GA terms are sums
    w = torch.nn.Parameter(torch.tensor(0.5))

    def model(x_t, t, class_labels):
        return SimpleNamespace(sample=x_t * w)

    loss, logs = get_method("ga")(context(alpha=3.07, ga_alpha=0.25)).loss(model, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(logs["forget"].item() + 0.25 * logs["retain"].item(), rel=1e-6)


# ----------------------------------------------------------------------------- F12: FID sets


def test_fid_sets_as_the_reference():
    from erasure.core.data import ImageData
    from erasure.ddpm.evaluate import fid_real_images, grid_column, sample_labels

    labels = sample_labels(4, 1, 2, 5)
    assert [int((labels == c).sum()) for c in range(4)] == [5, 2, 5, 5]
    assert torch.equal(sample_labels(3, 0, 2), torch.tensor([0, 0, 1, 1, 2, 2]))  # default: the same count for every class
    assert grid_column(torch.arange(17).view(17, 1, 1, 1), labels, 4, 6).shape == (4, 2, 1, 1, 1)
    held = ImageData(torch.arange(30, dtype=torch.uint8).view(30, 1, 1, 1), torch.arange(30) % 3, ["a", "b", "c"])
    config = load(None, ["eval.fid.real_images_per_class=4"])
    real = fid_real_images(held, [1, 2], config).flatten().tolist()
    assert real == [1, 4, 7, 10, 2, 5, 8, 11]  # the first 4 of each retained class, in dataset order
    assert len(fid_real_images(held, [1, 2], load(None, []))) == 20
    with pytest.raises(ErasureError, match="real_images_per_class"):
        load(None, ["eval.fid.real_images=10", "eval.fid.real_images_per_class=4"])


# ----------------------------------------------------------------------------- fingerprints


def test_each_new_key_lands_in_the_fingerprint_of_the_stage_that_reads_it():
    from erasure.ddpm.pipeline import base_stage, erase_stage, judge_stage

    base = load(None, [])
    stages = {"base": lambda c: base_stage(c).fingerprint, "erase": lambda c: erase_stage(c, "salun").fingerprint}
    stages["judge"] = lambda c: judge_stage(c).fingerprint
    reads = {
        "data.random_flip=true": {"base", "erase"},
        "model.dropout=0.1": {"base", "erase"},
        "model.attention_head_dim=null": {"base", "erase"},
        "model.attention_resolutions=[4]": {"base", "erase"},
        "model.conventions=diffusers": {"base", "erase"},
        "train.schedule=constant": {"base", "erase"},
        "train.ema_warmup=false": {"base", "erase"},
        "unlearn.mask.batches=4": {"erase"},
        "unlearn.mask.loss_reduction=mean": {"erase"},
        "unlearn.ga_alpha=2": {"erase"},
        "train.data_order=random": {"base", "erase"},
        "unlearn.data_order=random": {"erase"},
        "classifier.arch=resnet34": {"judge"},
        "classifier.epochs=3": {"judge"},
        "classifier.head_lr_scale=5": {"judge"},
        "classifier.weight_decay=0": {"judge"},
        "classifier.pretrained=false": {"judge"},
        "classifier.weights=/data/resnet34.pth": {"judge"},
        "eval.fid_samples_per_class=7": set(),
        "eval.fid.real_images_per_class=7": set(),
    }
    for override, expected in reads.items():
        changed = load(None, [override])
        assert {s for s, f in stages.items() if f(changed) != f(base)} == expected, override
