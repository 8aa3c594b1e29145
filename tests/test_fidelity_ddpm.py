"""The DDPM erasure follows the reference protocol: condition dropout, defaults, sampling record."""

from types import SimpleNamespace

import pytest
import torch

from erasure.ddpm.config import Config, SampleConfig, UnlearnConfig
from erasure.ddpm.methods import EraseContext, get_method
from erasure.ddpm.model import noise_scheduler

NULL = 10


class LabelRecorder(torch.nn.Module):
    """Stands in for the UNet: records the class labels of every call, predicts a scaled input."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, class_labels):
        self.calls.append(class_labels.clone())
        return SimpleNamespace(sample=x * self.w)


def context(**unlearn) -> EraseContext:
    g = torch.Generator().manual_seed(0)
    retain_labels = torch.randint(1, 10, (200,), generator=g)
    # These tests count labels in full batches of batch_size (the forget set here is smaller than
    # one); the data order has its own tests in test_ddpm_fidelity.py.
    unlearn.setdefault("data_order", "random")
    return EraseContext(
        config=UnlearnConfig(batch_size=64, **unlearn),
        sample=SampleConfig(steps=4),
        scheduler=noise_scheduler(),
        forget_images=torch.randn(50, 1, 8, 8, generator=g),
        retain_images=torch.randn(200, 1, 8, 8, generator=g),
        retain_labels=retain_labels,
        forget_class=0,
        target_class=1,
        null_class=NULL,
    )


def null_rates(method: str, steps: int = 40, **unlearn) -> dict[str, float]:
    """Fraction of null labels in each kind of call (RL-style losses call target, forget, retain)."""
    ctx = context(**unlearn)
    m, model = get_method(method)(ctx), LabelRecorder()
    for step in range(steps):
        m.loss(model, torch.Generator().manual_seed(step))
    # One batch_size-long batch per kind, in this order; a UNet call may carry several (eps_of_batches).
    batches = torch.cat(model.calls).split(ctx.config.batch_size)
    per_step = len(batches) // steps
    kinds = {3: ["target", "forget", "retain"], 2: ["forget", "retain"]}[per_step]
    return {k: torch.cat(batches[i::per_step]).eq(NULL).float().mean().item() for i, k in enumerate(kinds)}


def test_reference_defaults_keep_ten_percent_condition_dropout():
    cfg = UnlearnConfig()
    assert cfg.retain_cond_drop == 0.1 and cfg.forget_cond_drop == 0.1  # reference noise_estimation_loss_conditional / model cond_drop_prob
    assert cfg.esd_eta == 1.0 and cfg.esd_trajectory == "trained"
    assert cfg.grad_clip == 1.0  # reference cifar10_saliency_unlearn.yml: optim.grad_clip 1.0


@pytest.mark.parametrize("method", ["rl", "salun", "random"])
def test_null_class_appears_in_retain_and_forget_batches_at_the_set_rate(method):
    rates = null_rates(method)  # 40 steps x 64 labels per kind
    for kind, rate in rates.items():
        assert 0.07 < rate < 0.13, (kind, rate)


def test_ga_drops_labels_too():
    rates = null_rates("ga")
    assert set(rates) == {"forget", "retain"} and all(0.07 < r < 0.13 for r in rates.values())


def test_zero_disables_the_dropout_per_branch():
    rates = null_rates("rl", retain_cond_drop=0.0)
    assert rates["retain"] == 0.0 and rates["forget"] > 0.05
    rates = null_rates("rl", forget_cond_drop=0.0, retain_cond_drop=0.3)
    assert rates["target"] == rates["forget"] == 0.0 and 0.25 < rates["retain"] < 0.35


def test_dropout_is_seeded():
    a = null_rates("rl", steps=3)
    b = null_rates("rl", steps=3)
    assert a == b


def test_retained_labels_are_never_the_forgotten_class():
    ctx = context()
    m, model = get_method("rl")(ctx), LabelRecorder()
    m.loss(model, torch.Generator().manual_seed(0))
    target, forget, retain = torch.cat(model.calls).split(ctx.config.batch_size)
    assert set(target.unique().tolist()) <= {1, NULL} and set(forget.unique().tolist()) <= {0, NULL}
    assert 0 not in retain.tolist()


@pytest.mark.parametrize("method", ["rl", "ga"])
def test_forget_and_retain_predictions_share_one_unet_call_with_the_separate_losses(method, monkeypatch):
    """eps_of_batches: the trained forget and retain predictions come from one call, and the loss is the two calls' loss."""
    import importlib

    from erasure.ddpm.config import ModelConfig
    from erasure.ddpm.model import build_unet, eps

    torch.manual_seed(0)
    unet = build_unet(ModelConfig(channels=[8, 16], layers_per_block=1, norm_groups=4), (1, 8, 8), 10)
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    fused, _ = get_method(method)(context()).loss(unet, torch.Generator().manual_seed(0))
    assert calls == ([64, 128] if method == "rl" else [128])  # (RL's no-grad target), then forget + retain together

    one_call_each = lambda m, *batches: [eps(m, *b) for b in batches]  # noqa: E731
    monkeypatch.setattr(importlib.import_module(f"erasure.ddpm.methods.{method}"), "eps_of_batches", one_call_each)
    separate, _ = get_method(method)(context()).loss(unet, torch.Generator().manual_seed(0))
    assert len(calls) == (5 if method == "rl" else 3)
    assert fused.item() == pytest.approx(separate.item(), rel=1e-5)


def test_bad_dropout_rates_are_refused():
    from erasure.core.errors import ErasureError

    cfg = Config()
    cfg.unlearn.retain_cond_drop = 1.5
    with pytest.raises(ErasureError, match="retain_cond_drop"):
        cfg.validate()


def test_sampling_protocols():
    assert SampleConfig().resolved() == (25, 0.0)  # fast default
    assert SampleConfig(protocol="reference").resolved() == (1000, 1.0)  # SalUn DDPM sample.py: --timesteps 1000 --eta 1
    assert SampleConfig().guidance == 2.0  # its --cond_scale


def test_reference_protocol_refuses_conflicting_steps():
    from erasure.core.config import load_config
    from erasure.core.errors import ErasureError

    with pytest.raises(ErasureError, match="protocol=reference"):
        load_config(None, ["sample.protocol=reference", "sample.steps=50"], schema=Config)
    assert load_config(None, ["sample.protocol=reference"], schema=Config).sample.resolved() == (1000, 1.0)


def test_reference_protocol_runs_1000_ancestral_steps(monkeypatch):
    from erasure.ddpm import model as ddpm_model

    calls = []

    def fake_guided(unet, x, t, labels, w, null):
        calls.append(int(t))
        return torch.zeros_like(x)

    monkeypatch.setattr(ddpm_model, "guided_eps", fake_guided)
    unet = ddpm_model.build_unet(Config().model, (1, 8, 8), 10)
    ddpm_model.sample(unet, torch.tensor([3]), SampleConfig(protocol="reference"), seed=0, progress=False)
    assert len(calls) == 1000 and calls[0] == 999 and calls[-1] == 0


def test_sampling_record_names_protocol_steps_eta_and_guidance():
    from erasure.ddpm.model import sampling_record

    record = sampling_record(SampleConfig(protocol="reference", guidance=3.0))
    assert (record["protocol"], record["steps"], record["eta"], record["guidance"]) == ("reference", 1000, 1.0, 3.0)


def test_switching_the_sampling_protocol_reuses_finished_erasures():
    from erasure.core.config import load_config
    from erasure.ddpm.pipeline import erase_stage

    fast = load_config(None, [], schema=Config)
    reference = load_config(None, ["sample.protocol=reference"], schema=Config)
    assert erase_stage(fast, "salun").fingerprint == erase_stage(reference, "salun").fingerprint
    changed = load_config(None, ["unlearn.retain_cond_drop=0"], schema=Config)
    assert erase_stage(fast, "salun").fingerprint != erase_stage(changed, "salun").fingerprint


def test_esd_draws_its_trajectory_with_the_trained_model_by_default():
    ctx = context(esd_ddim_steps=4)
    trained, frozen_calls = LabelRecorder(), []
    esd = get_method("esd")(ctx)
    esd.prepare(trained)
    esd.frozen.forward = lambda x, t, class_labels: frozen_calls.append(class_labels) or SimpleNamespace(sample=x)
    for step in range(8):
        esd.loss(trained, torch.Generator().manual_seed(step))
    # the frozen copy gives only the two targets per step (null and class, in one call); the trained model also draws x_t
    assert len(frozen_calls) == 8 and all(len(c) == 2 * ctx.config.batch_size for c in frozen_calls) and len(trained.calls) > 8
    assert all(set(c.unique().tolist()) <= {0, NULL} for c in trained.calls)  # no condition dropout in ESD


def test_timesteps_are_antithetic_as_the_reference_trains():
    """Half the batch drawn, the other half mirrored (T - 1 - t); an odd batch keeps the first n; iid is a named option."""
    from erasure.ddpm.config import Config
    from erasure.ddpm.model import draw_timesteps

    assert Config().train.timesteps == "antithetic" and Config().unlearn.timesteps == "antithetic"
    g = torch.Generator().manual_seed(0)
    t = draw_timesteps(7, 1000, g, torch.device("cpu"))
    assert len(t) == 7 and torch.equal(t[4:], 999 - t[:3])  # n // 2 + 1 = 4 drawn, then 3 mirrors
    t = draw_timesteps(8, 1000, g, torch.device("cpu"))
    assert torch.equal(t[5:], 999 - t[:3]) and t.min() >= 0 and t.max() <= 999
    iid = draw_timesteps(4000, 1000, torch.Generator().manual_seed(1), torch.device("cpu"), antithetic=False)
    assert not torch.equal(iid[2001:4000], 999 - iid[:1999])


def test_erasure_starts_from_the_raw_weights_as_the_reference(tmp_path):
    """The base keeps its raw weights beside the EMA model; erasure and its mask start from them unless start_weights=ema."""
    from erasure.core.errors import ErasureError
    from erasure.core.io import load_tensors
    from erasure.ddpm import pipeline
    from erasure.ddpm.config import load
    from erasure.ddpm.model import load_unet

    overrides = ["model.channels=[8,16]", "train.steps=6", "train.batch_size=16", "train.warmup_steps=2", f"workdir={tmp_path}"]
    base = pipeline.train_base(load(None, overrides))
    raw = load_tensors(base.parent / pipeline.RAW_WEIGHTS)
    ema = load_unet(base).state_dict()
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    start = pipeline.start_weights(load(None, overrides), base, "cpu").state_dict()
    assert all(torch.equal(start[k], raw[k]) for k in raw)
    start = pipeline.start_weights(load(None, [*overrides, "unlearn.start_weights=ema"]), base, "cpu").state_dict()
    assert all(torch.equal(start[k], ema[k]) for k in ema)
    (base.parent / pipeline.RAW_WEIGHTS).unlink()  # a base trained before raw weights were kept
    with pytest.raises(ErasureError, match="unlearn.start_weights=ema"):
        pipeline.finished_base(load(None, overrides))
    assert pipeline.finished_base(load(None, [*overrides, "unlearn.start_weights=ema"])) == base


def test_ddpm_esd_pairs_trajectory_and_timestep_as_the_original():
    """The DDPM ESD shares SD's draw (erasure.core.esd): 51 - t_enc DDIM steps, a training step in t_enc's bucket."""
    from erasure.core.esd import draw_esd_step

    assert UnlearnConfig().esd_timestep == "original"
    host = torch.Generator().manual_seed(3)
    timesteps = list(range(980, -1, -20))  # diffusers DDIM, 50 steps, no offset
    for _ in range(300):
        stop, t = draw_esd_step(host, 50, 1000, timesteps, "original")
        assert stop == min(50, 51 - t // 20)
        stop, t = draw_esd_step(host, 50, 1000, timesteps, "matched")
        assert t == timesteps[stop]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_esd_cuda_graph_gives_the_eager_losses_as_the_weights_change(precision):
    """unlearn.esd_cuda_graph: the same losses step after step (the graph sees each update; on a CPU it is not used)."""
    import copy
    import dataclasses

    from erasure.ddpm.config import ModelConfig
    from erasure.ddpm.model import build_unet
    from tests.conftest import DEVICE

    base = build_unet(ModelConfig(channels=[8, 16], layers_per_block=1, norm_groups=4), (1, 8, 8), 10).to(DEVICE)
    ctx = context(esd_ddim_steps=4)
    ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, batch_size=2), forget_images=ctx.forget_images.to(DEVICE))
    losses = {}
    for graph in (False, True):
        esd = get_method("esd")(dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, esd_cuda_graph=graph)))
        model = copy.deepcopy(base)
        esd.prepare(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # large steps: a graph with stale weights would drift
        losses[graph] = []
        for step in range(4):
            with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss, _ = esd.loss(model, torch.Generator(DEVICE).manual_seed(step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[graph].append(loss.item())
        assert (esd.graphed is not None) == graph
    # Stale weights would show: drawing x_t with the step-0 weights (esd_trajectory=frozen) moves
    # the third and fourth losses by 1.5% and 9% on this setup; kernel choices inside a graph move them far less.
    assert losses[True] == pytest.approx(losses[False], rel=1e-2 if precision == "bf16" else 1e-3)


@pytest.mark.parametrize("name", ["salun", "rl", "ga", "esd"])
def test_a_ddpm_erasure_step_never_waits_for_the_gpu(name):
    """No host synchronisation inside a DDPM erasure step (on CUDA, sync debug mode raises at any),
    as for the SD and classification steps; ESD's trajectory runs through its CUDA graph there. On a CPU the steps just run."""
    import dataclasses

    from erasure.ddpm.config import ModelConfig
    from erasure.ddpm.model import build_unet
    from tests.conftest import DEVICE, no_host_sync

    device = torch.device(DEVICE)
    model = build_unet(ModelConfig(channels=[8, 16], layers_per_block=1, norm_groups=4), (1, 8, 8), 10).to(device)
    ctx = context(esd_ddim_steps=4)
    on_device = {k: getattr(ctx, k).to(device) for k in ("forget_images", "retain_images", "retain_labels")}
    ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, batch_size=4), **on_device)
    method = get_method(name)(ctx)
    method.prepare(model)
    g = torch.Generator(device).manual_seed(0)
    method.loss(model, g)[0].backward()  # the first step may initialise things (cuBLAS handles, ESD's graph capture)
    with no_host_sync():
        for _ in range(3):  # ESD's trajectory length varies with the draw
            loss, _ = method.loss(model, g)
            loss.backward()
    assert torch.isfinite(loss.detach()).all()
