"""The reference's Conditional_Model, as weights: our reference-layout UNet computes the same
function, and `erasure import-ddpm` turns its ckpt.pth into a finished base model.

The reference model is written here from its description (docs/protocols.md): weight names
and shapes of ``Conditional_Model``, and a plain functional forward over them. No code of the
reference is used, and nothing of ours: a mistake in our mapping shows as a different output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from erasure.cli import main
from erasure.core.errors import ErasureError
from erasure.ddpm.config import ModelConfig, load
from erasure.ddpm.model import ClassConcatUNet2DModel, build_unet, load_unet
from erasure.ddpm.pipeline import finished_base, start_weights
from erasure.ddpm.reference import convert_state_dict

CH, MULT, BLOCKS, ATTN, CLASSES = 32, (1, 2), 1, (4,), 10  # 8 px images: levels at 8 and 4 px, attention at 4
OVERRIDES = ["model.channels=[32,64]", "model.layers_per_block=1", "model.attention=true",
             "model.attention_resolutions=[4]", "model.attention_head_dim=null", "model.norm_groups=32"]  # fmt: skip


def reference_layout(ch: int, mult: tuple[int, ...], blocks: int, attn: tuple[int, ...], size: int, in_ch: int) -> dict[str, tuple]:
    """Conditional_Model's weight names and shapes for ch, ch_mult, num_res_blocks, attn_resolutions and image size."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, i: int, o: int) -> None:
        shapes.update({f"{name}.weight": (o, i), f"{name}.bias": (o,)})

    def conv(name: str, i: int, o: int, k: int = 3) -> None:
        shapes.update({f"{name}.weight": (o, i, k, k), f"{name}.bias": (o,)})

    def norm(name: str, c: int) -> None:
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    def resnet(name: str, i: int, o: int) -> None:
        norm(f"{name}.norm1", i)
        conv(f"{name}.conv1", i, o)
        linear(f"{name}.temb_cemb_proj", 8 * ch, o)
        norm(f"{name}.norm2", o)
        conv(f"{name}.conv2", o, o)
        if i != o:
            conv(f"{name}.nin_shortcut", i, o, 1)

    def attention(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    linear("temb.dense.0", ch, 4 * ch)
    linear("temb.dense.1", 4 * ch, 4 * ch)
    shapes |= {"classes_emb.weight": (CLASSES, ch), "null_classes_emb": (ch,)}
    linear("cemb.dense.0", ch, 4 * ch)
    linear("cemb.dense.1", 4 * ch, 4 * ch)
    conv("conv_in", in_ch, ch)
    res, widths, block_in = size, (1, *mult), ch
    for level, m in enumerate(mult):
        for b in range(blocks):
            resnet(f"down.{level}.block.{b}", block_in, ch * m)
            block_in = ch * m
            if res in attn:
                attention(f"down.{level}.attn.{b}", block_in)
        if level != len(mult) - 1:
            conv(f"down.{level}.downsample.conv", block_in, block_in)
            res //= 2
    resnet("mid.block_1", block_in, block_in)
    attention("mid.attn_1", block_in)
    resnet("mid.block_2", block_in, block_in)
    for level in reversed(range(len(mult))):
        for b in range(blocks + 1):
            skip = ch * (widths[level] if b == blocks else mult[level])
            resnet(f"up.{level}.block.{b}", block_in + skip, ch * mult[level])
            block_in = ch * mult[level]
            if res in attn:
                attention(f"up.{level}.attn.{b}", block_in)
        if level != 0:
            conv(f"up.{level}.upsample.conv", block_in, block_in)
            res *= 2
    norm("norm_out", block_in)
    conv("conv_out", block_in, in_ch)
    return shapes


def reference_weights(in_ch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under Conditional_Model's names for the small test model, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in reference_layout(CH, MULT, BLOCKS, ATTN, 8, in_ch).items():
        if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
            weights[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            weights[name] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return weights


def reference_forward(w: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Conditional_Model's noise prediction, label CLASSES meaning the null class (its dropped condition)."""

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, w[f"{name}.weight"], w[f"{name}.bias"])

    def conv(name: str, h: torch.Tensor, **kw) -> torch.Tensor:
        k = w[f"{name}.weight"]
        return F.conv2d(h, k, w[f"{name}.bias"], padding=kw.get("padding", k.shape[-1] // 2), stride=kw.get("stride", 1))

    def gn(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.group_norm(h, 32, w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)

    half = CH // 2
    angles = t.float()[:, None] * torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))[None]
    temb = lin("temb.dense.1", F.silu(lin("temb.dense.0", torch.cat([angles.sin(), angles.cos()], 1))))
    table = torch.cat([w["classes_emb.weight"], w["null_classes_emb"][None]])
    cemb = lin("cemb.dense.1", F.silu(lin("cemb.dense.0", table[c])))
    emb = F.silu(torch.cat([temb, cemb], 1))

    def resnet(name: str, h: torch.Tensor) -> torch.Tensor:
        out = conv(f"{name}.conv1", F.silu(gn(f"{name}.norm1", h))) + lin(f"{name}.temb_cemb_proj", emb)[:, :, None, None]
        out = conv(f"{name}.conv2", F.silu(gn(f"{name}.norm2", out)))
        return (conv(f"{name}.nin_shortcut", h) if f"{name}.nin_shortcut.weight" in w else h) + out

    def attention(name: str, h: torch.Tensor) -> torch.Tensor:
        b, ch, hh, ww = h.shape
        n = gn(f"{name}.norm", h)
        q, k, v = (conv(f"{name}.{p}", n).flatten(2) for p in "qkv")  # (b, c, hw)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(ch), dim=-1)  # (b, hw_q, hw_k)
        return h + conv(f"{name}.proj_out", (v @ a.transpose(1, 2)).reshape(b, ch, hh, ww))

    hs = [conv("conv_in", x)]
    for level in range(len(MULT)):
        for b in range(BLOCKS):
            h = resnet(f"down.{level}.block.{b}", hs[-1])
            hs.append(attention(f"down.{level}.attn.{b}", h) if f"down.{level}.attn.{b}.q.weight" in w else h)
        if level != len(MULT) - 1:
            hs.append(conv(f"down.{level}.downsample.conv", F.pad(hs[-1], (0, 1, 0, 1)), stride=2, padding=0))
    h = resnet("mid.block_2", attention("mid.attn_1", resnet("mid.block_1", hs[-1])))
    for level in reversed(range(len(MULT))):
        for b in range(BLOCKS + 1):
            h = resnet(f"up.{level}.block.{b}", torch.cat([h, hs.pop()], 1))
            if f"up.{level}.attn.{b}.q.weight" in w:
                h = attention(f"up.{level}.attn.{b}", h)
        if level != 0:
            h = conv(f"up.{level}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv("conv_out", F.silu(gn("norm_out", h)))


def inputs(in_ch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, in_ch, 8, 8, generator=g), torch.tensor([0, 17, 500, 999]), torch.tensor([0, 3, 9, CLASSES])


def test_the_reference_layout_unet_computes_conditional_models_function():
    """Time and class embeddings concatenated (not added), the null class as the table's last row, every block in place."""
    cfg = ModelConfig(channels=[32, 64], layers_per_block=1, attention=True, attention_resolutions=[4],
                      attention_head_dim=None, norm_groups=32)  # fmt: skip
    unet = build_unet(cfg, (3, 8, 8), CLASSES).eval()
    assert isinstance(unet, ClassConcatUNet2DModel)
    weights = reference_weights(3, seed=0)
    unet.load_state_dict(convert_state_dict({f"module.{k}": v for k, v in weights.items()}))  # strict: every weight maps
    assert sum(p.numel() for p in unet.parameters()) == sum(v.numel() for v in weights.values())
    x, t, c = inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, class_labels=c).sample, reference_forward(weights, x, t, c), atol=1e-4, rtol=1e-4)


def test_the_reference_cifar10_unet_has_the_reference_parameter_count():
    """configs/cifar10.yaml builds a UNet as large as Conditional_Model with cifar10_train.yml (ch 128, mult 1,2,2,2)."""
    from pathlib import Path

    cfg = load(Path(__file__).parents[1] / "configs" / "cifar10.yaml")
    ours = sum(p.numel() for p in build_unet(cfg.model, (3, 32, 32), 10).parameters())
    reference = reference_layout(128, (1, 2, 2, 2), 2, (16,), 32, 3)
    assert ours == sum(math.prod(shape) for shape in reference.values()) == 38_632_323


def test_import_ddpm_makes_a_reference_checkpoint_the_base_model(tmp_path, capsys):
    """[raw state (DataParallel names), optimizer state, step, EMA state] -> raw weights where erasure starts, EMA as the model."""
    raw, ema = reference_weights(1, seed=1), reference_weights(1, seed=2)
    optimizer = {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 2e-4, "params": [0]}]}
    ckpt = tmp_path / "ckpt.pth"
    torch.save([{f"module.{k}": v for k, v in raw.items()}, optimizer, 799_999, ema], ckpt)
    workdir = tmp_path / "run"
    args = ["import-ddpm", "--checkpoint", str(ckpt), "--workdir", str(workdir), *OVERRIDES]
    assert main(args) == 0
    config = load(None, [f"workdir={workdir}", *OVERRIDES])
    base = finished_base(config)
    x, t, c = inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(load_unet(base)(x, t, class_labels=c).sample, reference_forward(ema, x, t, c), atol=1e-4, rtol=1e-4)
        erased_from = start_weights(config, base, "cpu")  # unlearn.start_weights=raw, as saliency_unlearn loads states[0]
        torch.testing.assert_close(erased_from(x, t, class_labels=c).sample, reference_forward(raw, x, t, c), atol=1e-4, rtol=1e-4)
    assert main(args) == 0  # a second import reuses the finished stage

    # Erasure starts from the imported model, and its card's "Use" code loads the erased UNet.
    assert main(["erase", "--workdir", str(workdir), *OVERRIDES, "unlearn.steps=2", "unlearn.batch_size=8"]) == 0
    card = (workdir / "erase" / "salun-forget0" / "README.md").read_text()
    code = card.split("## Use", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "load_unet" in code
    scope: dict = {}
    exec(code, scope)  # noqa: S102  (our own card's snippet)
    assert isinstance(scope["unet"], ClassConcatUNet2DModel)

    capsys.readouterr()
    other = ["import-ddpm", "--checkpoint", str(ckpt), "--workdir", str(tmp_path / "b"), *OVERRIDES, "model.channels=[32,32]"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "differs from this config's" in err and "model.channels" in err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["import-ddpm", "--checkpoint", str(tmp_path / "junk.pth"), "--workdir", str(tmp_path / "c"), *OVERRIDES]) == 2
    assert "could not read" in capsys.readouterr().err
    assert not (tmp_path / "b" / "ddpm").exists() and not (tmp_path / "c" / "ddpm").exists()  # a refused import leaves nothing
    assert main([*args[:3], "--workdir", str(tmp_path / "d"), *OVERRIDES, "model.conventions=diffusers"]) == 2
    assert "model.conventions=reference" in capsys.readouterr().err


def test_the_convert_refuses_a_foreign_state_dict():
    with pytest.raises(ErasureError, match="not a reference Conditional_Model"):
        convert_state_dict({"conv_in.weight": torch.zeros(1)})
    weights = reference_weights(3, seed=0) | {"down.0.block.0.film.weight": torch.zeros(1)}
    with pytest.raises(ErasureError, match="unexpected weight 'down.0.block.0.film.weight'"):
        convert_state_dict(weights)
