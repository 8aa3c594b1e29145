import os
import signal

import pytest
import torch

from erasure.core.errors import ErasureError
from erasure.core.loop import LoopSettings, make_accelerator, on_cpu, stage_precision, train
from erasure.core.saliency import Mask
from tests.conftest import DEVICE


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_step_loss(interrupt_at: int | None = None):
    target = torch.linspace(-1, 1, 64)[:, None]

    def step_loss(model, g, step):
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C or a cluster's SIGTERM does
        x = torch.randn(64, 4, generator=g, device=g.device)
        noise = torch.randn(64, 1, generator=g, device=g.device) * 0.1
        return torch.nn.functional.mse_loss(model(x), target.to(g.device) + noise), {}

    return step_loss


SETTINGS = dict(steps=12, lr=1e-2, seed=3, warmup_steps=2, cosine=True, weight_decay=0.1, ema_decay=0.9, checkpoint_every=5, log_every=1)


def test_resume_after_interruption_is_bit_identical(tmp_path):
    accelerator = make_accelerator(DEVICE)
    straight, straight_ema = train(net(), make_step_loss(), LoopSettings(**SETTINGS), tmp_path / "a", accelerator, fingerprint="x")

    with pytest.raises(KeyboardInterrupt):
        train(net(), make_step_loss(interrupt_at=7), LoopSettings(**SETTINGS), tmp_path / "b", accelerator, fingerprint="x")
    state = (tmp_path / "b" / "checkpoint" / "state.json").read_text()
    assert '"step": 8' in state  # the interrupted step was finished, then saved
    resumed, resumed_ema = train(net(), make_step_loss(), LoopSettings(**SETTINGS), tmp_path / "b", accelerator, fingerprint="x")

    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(straight_ema.shadow_params, resumed_ema.shadow_params):
        assert torch.equal(a, b)
    # The resumed log has each step exactly once.
    steps = [int(line.split(",")[0]) for line in (tmp_path / "b" / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(12))


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    accelerator = make_accelerator(DEVICE)
    with pytest.raises(KeyboardInterrupt):
        train(net(), make_step_loss(interrupt_at=2), LoopSettings(**SETTINGS), tmp_path, accelerator, fingerprint="x")
    with pytest.raises(ErasureError, match="different settings"):
        train(net(), make_step_loss(), LoopSettings(**SETTINGS), tmp_path, accelerator, fingerprint="y")


def test_mask_holds_through_the_loop_and_its_resume(tmp_path):
    accelerator = make_accelerator(DEVICE)
    base = net()
    mask = Mask.random(base, 0.3, seed=1)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(KeyboardInterrupt):
        train(net(), make_step_loss(interrupt_at=4), LoopSettings(**SETTINGS), tmp_path, accelerator, constraint_mask=mask, fingerprint="m")
    model, _ = train(net(), make_step_loss(), LoopSettings(**SETTINGS), tmp_path, accelerator, constraint_mask=mask, fingerprint="m")
    for n, p in model.named_parameters():
        keep, p = mask.tensors[n], p.detach().cpu()  # trained on DEVICE; the mask and `before` are CPU tensors
        assert torch.equal(p[~keep], before[n][~keep]), n
        assert not keep.any() or not torch.equal(p[keep], before[n][keep]), n


def test_a_resumed_run_keeps_its_state_beside_its_weights(tmp_path, monkeypatch):
    """A checkpoint holds CPU, contiguous tensors; resumed, the optimizer state and the EMA take each weight's
    device and layout. On CUDA, fused AdamW refused channels-last weights with contiguous moments."""
    import erasure.core.loop as loop

    def conv_net() -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 1))
        return model.to(memory_format=torch.channels_last)  # what the SD and classification paths do on a GPU

    def step_loss(model, g, step):
        if step == 3 and len(optimizers) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        x = torch.randn(8, 2, 4, 4, generator=g, device=g.device).contiguous(memory_format=torch.channels_last)
        return model(x).pow(2).mean(), {}

    optimizers = []
    make = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda params, s: optimizers.append(make(params, s)) or optimizers[-1])
    settings = LoopSettings(steps=6, lr=1e-2, ema_decay=0.9, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(conv_net(), step_loss, settings, tmp_path, make_accelerator(DEVICE), fingerprint="c")
    model, ema = train(conv_net(), step_loss, settings, tmp_path, make_accelerator(DEVICE), fingerprint="c")
    params = [p for p in model.parameters()]
    assert params[0].stride() != params[0].contiguous().stride()  # the case in question: a channels-last weight
    for p in params:
        for key, value in optimizers[-1].state[p].items():
            if value.shape == p.shape:
                assert (value.device, value.stride()) == (p.device, p.stride()), key
    for p, shadow in zip(params, ema.shadow_params):
        assert (shadow.device, shadow.dtype, shadow.stride()) == (p.device, p.dtype, p.stride())


def test_stages_with_different_precisions_share_one_process(tmp_path):
    """accelerate's state is process-wide: a bf16 stage then an fp32 stage crashed `erasure demo` on CUDA.

    bf16 forced on the CPU reproduces it without a GPU.
    On the GPU, the model and data must follow the device.
    """
    bf16 = make_accelerator(DEVICE, "bf16")
    ones = torch.ones(2, 2, device=bf16.device)  # autocast acts on its own device's tensors only
    with bf16.autocast():
        assert (ones @ ones).dtype == torch.bfloat16
    train(net(), make_step_loss(), LoopSettings(steps=2, lr=1e-2), tmp_path / "a", bf16)
    fp32 = make_accelerator(DEVICE, "no")  # raised ValueError: AcceleratorState has already been initialized
    with fp32.autocast():
        assert (ones @ ones).dtype == torch.float32
    train(net(), make_step_loss(), LoopSettings(steps=2, lr=1e-2), tmp_path / "b", fp32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to move from")
def test_one_process_moves_between_the_gpu_and_the_cpu(tmp_path):
    """accelerate's state fixes the device too: a CPU stage after a CUDA one raised (the test suite on a GPU did)."""
    for i, device in enumerate(["cuda", "cpu", "cuda"]):
        accelerator = make_accelerator(device)
        assert accelerator.device.type == device
        train(net(), make_step_loss(), LoopSettings(steps=2, lr=1e-2), tmp_path / str(i), accelerator)


def test_fp16_training_is_refused_clearly():
    with pytest.raises(ErasureError, match="fp16"):
        make_accelerator(DEVICE, "fp16")


@pytest.mark.slow  # torch.compile takes a while on a CPU
def test_compiled_training_keeps_masked_weights_and_checkpoint_keys(tmp_path):
    """train(compile=True) compiles in place: same state-dict keys, the mask still holds bit for bit."""
    model = net()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    mask = Mask.from_scores(model, {n: torch.rand_like(p) for n, p in model.named_parameters()}, 0.5)
    settings = LoopSettings(steps=3, lr=1e-2, compile=True, weight_decay=0.1)
    trained, _ = train(model, make_step_loss(), settings, tmp_path, make_accelerator(DEVICE), constraint_mask=mask)
    assert set(trained.state_dict()) == set(base)
    for n, p in trained.named_parameters():
        keep = mask.tensors[n]
        assert torch.equal(p.detach().cpu()[~keep], base[n][~keep])
        assert not torch.equal(p.detach().cpu()[keep], base[n][keep])


def test_sgd_takes_nesterov_momentum_as_a_named_option():
    from erasure.core.loop import make_optimizer

    params = list(net().named_parameters())
    plain = make_optimizer(params, LoopSettings(steps=1, lr=0.1, optimizer="sgd"))
    nesterov = make_optimizer(params, LoopSettings(steps=1, lr=0.1, optimizer="sgd", nesterov=True))
    assert plain.defaults["nesterov"] is False and nesterov.defaults["nesterov"] is True  # the reference: plain momentum
    with pytest.raises(ErasureError, match="Nesterov"):
        make_optimizer(params, LoopSettings(steps=1, lr=0.1, optimizer="sgd", nesterov=True, momentum=0.0))


def test_lr_scales_train_a_parameter_group_at_its_multiple_of_the_lr(tmp_path):
    """A name prefix in lr_scales gets its own parameter group at that multiple of the lr; "adam" is torch's Adam (L2 decay)."""
    from erasure.core.loop import make_optimizer

    start = net()
    head = next(n for n, _ in start.named_parameters()).split(".")[0] + "."  # the first layer stands in for a new head
    adam = make_optimizer(list(start.named_parameters()), LoopSettings(steps=1, lr=0.1, optimizer="adam", lr_scales=((head, 10.0),)))
    assert type(adam) is torch.optim.Adam and [(g["lr"], g["lr_scale"]) for g in adam.param_groups] == [(1.0, 10.0), (0.1, 1.0)]
    moved = {}
    for scale in (1.0, 10.0):  # one plain SGD step: the update is -lr * gradient, the gradient the same in both runs
        model = net()
        model.load_state_dict(start.state_dict())
        settings = LoopSettings(steps=1, lr=0.1, optimizer="sgd", momentum=0.0, grad_clip=None, lr_scales=((head, scale),))
        trained, _ = train(model, make_step_loss(), settings, tmp_path / str(scale), make_accelerator("cpu", "no"))
        moved[scale] = {n: p.detach().cpu() - start.state_dict()[n] for n, p in trained.named_parameters()}
    for name, delta in moved[10.0].items():
        expected = moved[1.0][name] * (10 if name.startswith(head) else 1)
        assert delta.abs().max() > 0 and torch.allclose(delta, expected, rtol=1e-4, atol=1e-6), name  # w + d - w rounds d


def test_a_non_finite_loss_is_caught_before_anything_is_saved(tmp_path):
    """The loss is read back only on logged steps and before checkpoints, yet a NaN is never checkpointed."""
    from erasure.core.io import load_checkpoint

    base = make_step_loss()

    def step_loss(model, g, step):
        loss, logs = base(model, g, step)
        return (loss * float("nan") if step == 6 else loss), {"tensor_log": loss.detach()}

    settings = LoopSettings(**{**SETTINGS, "log_every": 4})  # checks after steps 0, 4 (checkpoint at 5), 8, ...
    with pytest.raises(ErasureError, match="between steps 5 and 8"):
        train(net(), step_loss, settings, tmp_path, make_accelerator(DEVICE), fingerprint="x")
    assert load_checkpoint(tmp_path / "checkpoint")["step"] == 5  # the checkpoint before the bad step, untouched
    import csv

    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert float(rows[0]["tensor_log"]) == float(rows[0]["loss"])  # a tensor the method logged became a number


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_call_replays_with_the_current_weights_under_autocast():
    """A captured call reads the weights as they are at each replay, also through bf16 autocast's casts."""
    from erasure.core.graphs import GraphedCall

    layer = torch.nn.Linear(16, 16).cuda()  # a trainable leaf: the kind of weight autocast caches casts of
    call = GraphedCall(layer)
    x = torch.randn(4, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # one long region: its cast cache would hold stale weights
        for _ in range(3):
            with torch.no_grad():
                # The expected value casts by hand: an eager layer(x) here would itself read the cached cast.
                expected = torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
                torch.testing.assert_close(call(x), expected)
                layer.weight.add_(0.5)  # in place, as an optimizer step
            x = x + 1
    assert len(call.graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_call_captures_again_when_a_watched_weight_gets_new_storage():
    """A graph reads the memory it was captured with. hold_frozen_weights_in_bf16 gives weights new storage
    (``p.data = ...``); replaying the old graph read freed memory (the SD bf16-hold test failed on an H100)."""
    from erasure.core.graphs import GraphedCall

    layer = torch.nn.Linear(16, 16).cuda()
    call = GraphedCall(layer, watch=layer)
    x = torch.randn(4, 16, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(call(x), layer(x))
        first = next(iter(call.graphs.values()))[1]
        layer.weight.data = layer.weight.data * 2  # new storage; the old block is freed...
        torch.full((16 * 16,), float("nan"), device="cuda")  # ...and may be handed out again
        torch.testing.assert_close(call(x), layer(x))
    assert len(call.graphs) == 1 and next(iter(call.graphs.values()))[1] is not first


def test_accelerates_cpu_flag_puts_every_stage_and_evaluation_on_the_cpu(monkeypatch):
    """``ACCELERATE_USE_CPU`` makes accelerate's Accelerator run on the CPU even where CUDA exists;
    the precision a stage resolves (and fingerprints) and the evaluation commands' device follow it."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    config = SimpleNamespace(mixed_precision="auto", device="auto")
    assert not on_cpu() and on_cpu("cpu") and not on_cpu("cuda:1")
    assert stage_precision(config) == "bf16"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert on_cpu() and on_cpu("cuda")
    assert stage_precision(config) == "no"  # as the Accelerator, forced onto the CPU, will train
