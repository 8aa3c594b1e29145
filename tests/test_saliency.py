import pytest
import torch

from erasure.core.errors import ErasureError
from erasure.core.saliency import Mask, MaskConstraint, accumulate_gradients, model_fingerprint, threshold, top_fraction


def brute_force(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Stable descending sort of all scores; the first round(ratio * n) are kept."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(round(ratio * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return out


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_global_threshold_matches_brute_force(ratio):
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(7, 5, generator=g), "b": torch.rand(13, generator=g), "c": torch.rand(2, 3, 4, generator=g)}
    mask = threshold(scores, ratio)
    expected = brute_force(scores, ratio)
    for n in scores:
        assert torch.equal(mask[n], expected[n])


def test_threshold_with_ties_keeps_exact_count_in_index_order():
    # Many exact ties straddle the threshold: quantized scores.
    g = torch.Generator().manual_seed(2)
    scores = {"a": torch.randint(0, 4, (50,), generator=g).float(), "b": torch.randint(0, 4, (31,), generator=g).float()}
    for ratio in (0.2, 0.5, 0.77):
        mask, expected = threshold(scores, ratio), brute_force(scores, ratio)
        assert sum(int(m.sum()) for m in mask.values()) == round(ratio * 81)
        for n in scores:
            assert torch.equal(mask[n], expected[n])


def test_per_layer_threshold():
    g = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(40, generator=g) * 100, "b": torch.rand(20, generator=g)}
    global_mask = threshold(scores, 0.5)
    per_layer = threshold(scores, 0.5, per_layer=True)
    assert int(per_layer["a"].sum()) == 20 and int(per_layer["b"].sum()) == 10
    assert int(global_mask["b"].sum()) == 0  # globally, the large tensor wins everything
    for n in scores:
        assert torch.equal(per_layer[n], brute_force({n: scores[n]}, 0.5)[n])


def test_nan_scores_are_an_error():
    with pytest.raises(ErasureError, match="NaN"):
        top_fraction(torch.tensor([1.0, float("nan"), 0.5]), 0.5)


def test_accumulate_gradients_sums_clipped_signed_gradients():
    net = small_net()
    batches = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def loss(m, x):
        return m(x).pow(2).sum() * 100  # large, so clipping to norm 1 matters

    total = accumulate_gradients(net, loss, batches, clip_norm=1.0, progress=False)
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for x in batches:
        grads = torch.autograd.grad(loss(net, x), list(net.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for (n, _), gr in zip(net.named_parameters(), grads):
            expected[n] += gr * min(1.0, 1.0 / (float(norm) + 1e-6))
    for n in expected:
        torch.testing.assert_close(total[n], expected[n], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in net.parameters())


def test_save_load_round_trip_is_exact_and_compact(tmp_path):
    net = small_net()
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(5)) for n, p in net.named_parameters()}
    mask = Mask.from_scores(net, scores, 0.4, loss="test")
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    loaded = Mask.load(path, net)
    for n in mask.tensors:
        assert torch.equal(mask.tensors[n], loaded.tensors[n])
    assert loaded.info["ratio"] == 0.4 and loaded.info["loss"] == "test"
    assert loaded.fingerprint == model_fingerprint(net)
    assert loaded.kept_fraction == pytest.approx(round(0.4 * 53) / 53)
    # Bit-packed: one byte holds eight weights (plus per-tensor padding and the header).
    assert path.stat().st_size < 53 + 2048


def test_mask_for_another_model_is_a_clear_error(tmp_path):
    mask = Mask.random(small_net(), 0.5)
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with pytest.raises(ErasureError, match=r"does not fit this model.*shape mismatches.*'0.weight'.*compute a new mask"):
        Mask.load(path, other)
    renamed = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3), torch.nn.Linear(3, 3))
    with pytest.raises(ErasureError, match="not in the mask"):
        Mask.load(path, renamed)


def test_corrupt_or_foreign_mask_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ErasureError, match="corrupt"):
        Mask.load(bad)
    from safetensors.torch import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ErasureError, match="not an erasure mask"):
        Mask.load(foreign)
    with pytest.raises(ErasureError, match="does not exist"):
        Mask.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.5),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1),
    ],
    ids=["adamw-wd", "sgd-momentum-wd", "adam-l2"],
)
def test_masked_out_weights_stay_bit_identical(make_optimizer):
    net = small_net()
    mask = Mask.random(net, 0.5, seed=3)
    # A tensor fully masked out, and one fully trainable: both edge cases.
    mask.tensors["2.bias"][:] = False
    mask.tensors["0.bias"][:] = True
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    constraint = MaskConstraint(net, mask)
    opt = make_optimizer(net.parameters())
    for step in range(25):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        for n, p in net.named_parameters():
            assert torch.all(p.grad[~mask.tensors[n]] == 0)
        opt.step()
        constraint.enforce()
    for n, p in net.named_parameters():
        keep = mask.tensors[n]
        assert torch.equal(p.detach()[~keep], before[n][~keep]), n  # bit-identical
        if keep.any():
            assert not torch.equal(p.detach()[keep], before[n][keep]), n  # and the rest did train
    # Without the constraint the same optimizer moves masked-out weights (weight decay, momentum).
    net2 = small_net()
    opt2 = make_optimizer(net2.parameters())
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        opt2.zero_grad()
        net2(x).pow(2).mean().backward()
        for n, p in net2.named_parameters():
            p.grad *= mask.tensors[n]
        opt2.step()
    assert any(not torch.equal(p.detach()[~mask.tensors[n]], before[n][~mask.tensors[n]]) for n, p in net2.named_parameters())


@pytest.mark.parametrize(
    "make_optimizer, restores",
    [
        (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.0), False),
        (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), False),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), False),
        (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01), True),
        (lambda p: torch.optim.RMSprop(p, lr=0.1), True),  # not known to leave them alone: restored to be safe
    ],
    ids=["adamw", "adam-amsgrad", "sgd-nesterov", "adamw-wd", "rmsprop"],
)
def test_the_restore_pass_is_skipped_only_where_the_optimizer_cannot_move_masked_weights(make_optimizer, restores, monkeypatch):
    net = small_net()
    mask = Mask.random(net, 0.5, seed=3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    constraint, opt = MaskConstraint(net, mask), make_optimizer(net.parameters())
    calls = []
    real = torch.Tensor.masked_scatter_
    monkeypatch.setattr(torch.Tensor, "masked_scatter_", lambda self, *a: calls.append(1) or real(self, *a))
    for step in range(25):
        opt.zero_grad()
        net(torch.randn(8, 6, generator=torch.Generator().manual_seed(step))).pow(2).mean().backward()
        opt.step()
        constraint.enforce(opt)
    assert bool(calls) == restores
    for n, p in net.named_parameters():
        assert torch.equal(p.detach()[~mask.tensors[n]], before[n][~mask.tensors[n]]), n  # bit-identical either way


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_threshold_on_gpu_matches_cpu():
    scores = {"a": torch.rand(1000, 10), "b": torch.rand(777)}
    cpu = threshold(scores, 0.5)
    gpu = threshold({n: s.cuda() for n, s in scores.items()}, 0.5)
    for n in scores:
        assert torch.equal(cpu[n], gpu[n].cpu())
