"""Start from a DDPM trained with the reference code: its ``ckpt.pth`` becomes a finished base stage.

The SalUn DDPM code (and Selective Amnesia's, which it extends) trains ``Conditional_Model``
for 800,000 steps and saves ``[model.state_dict(), optimizer.state_dict(), (epoch,) step,
ema.state_dict()]``. Its layout is our ``model.conventions: reference`` UNet
(:class:`~erasure.ddpm.model.ClassConcatUNet2DModel`), so the weights carry over name by name:
the raw ones become the base's raw weights (where erasure starts) and the EMA ones its model
(what the "original" row samples), as :func:`~erasure.ddpm.pipeline.train_base` leaves them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from erasure.core.data import load_data
from erasure.core.errors import ErasureError
from erasure.core.io import save_tensors
from erasure.ddpm.config import Config
from erasure.ddpm.model import build_unet, noise_scheduler, save_model
from erasure.ddpm.pipeline import RAW_WEIGHTS, base_stage

# Reference module -> ours, per ResNet and attention block; attention's 1x1 convs become linears.
_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_cemb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
           "nin_shortcut": "conv_shortcut"}  # fmt: skip
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_FIXED = {
    "temb.dense.0": "time_embedding.inner.linear_1",
    "temb.dense.1": "time_embedding.inner.linear_2",
    "cemb.dense.0": "class_embedding.inner.1.linear_1",
    "cemb.dense.1": "class_embedding.inner.1.linear_2",
    "conv_in": "conv_in",
    "norm_out": "conv_norm_out",
    "conv_out": "conv_out",
}


def _block(prefix: str, kind: str, i: int, rest: str) -> str:
    """The diffusers name of ``rest`` in the ``i``-th reference ResNet (``block``) or attention (``attn``) of ``prefix``."""
    module, param = rest.split(".", 1)
    group, table = ("resnets", _RESNET) if kind == "block" else ("attentions", _ATTENTION)
    return f"{prefix}.{group}.{i}.{table[module]}.{param}"  # an unknown module: KeyError


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``Conditional_Model`` state dict in :class:`ClassConcatUNet2DModel`'s names and shapes.

    The separate null-class embedding becomes the table's last row (our null class), and the
    attention's 1x1 convolutions become the linear layers diffusers uses. A ``module.`` prefix
    (the reference trains under ``DataParallel``) is dropped.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "classes_emb.weight" not in state or "null_classes_emb" not in state:
        raise ErasureError("this checkpoint is not a reference Conditional_Model (no classes_emb / null_classes_emb).")
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down\.(\d+)\.", k)))
    out = {"class_embedding.inner.0.weight": torch.cat([state.pop("classes_emb.weight"), state.pop("null_classes_emb")[None]])}
    for key, value in state.items():
        name, param = key.rsplit(".", 1)
        try:
            if name in _FIXED:
                new = f"{_FIXED[name]}.{param}"
            elif m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", key):
                side, level, kind, i, rest = m.groups()
                # The reference indexes up levels by resolution (0: full size); diffusers runs them lowest first.
                index = int(level) if side == "down" else levels - 1 - int(level)
                new = _block(f"{side}_blocks.{index}", kind, int(i), rest)
            elif m := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(\w+)", key):
                new = f"down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
            elif m := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(\w+)", key):
                new = f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
            elif m := re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(.+)", key):
                part, rest = m.groups()
                kind, i = ("attn", 0) if part == "attn_1" else ("block", int(part[-1]) - 1)
                new = _block("mid_block", kind, i, rest)
            else:
                raise KeyError(key)
        except KeyError:
            raise ErasureError(f"unexpected weight '{key}' in the checkpoint: is it a reference Conditional_Model?") from None
        if re.search(r"\.to_(q|k|v|out\.0)\.weight$", new):
            value = value.flatten(1)  # a 1x1 conv's (C, C, 1, 1) kernel is a linear layer's (C, C) matrix
        out[new] = value
    return out


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The (raw, EMA) weights of a reference ``ckpt.pth``, read with ``weights_only=True`` (no code unpickled).

    A bare state dict is taken as raw weights without EMA.
    """
    path = Path(path)
    if not path.is_file():
        raise ErasureError(f"'{path}' does not exist; give the reference run's ckpts/ckpt.pth.")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises several kinds for a foreign or corrupt file)
        raise ErasureError(f"could not read '{path}' as a torch checkpoint of tensors ({str(e).splitlines()[0]}).") from None
    if isinstance(states, dict):
        return states, None
    if not isinstance(states, (list, tuple)) or not states or not isinstance(states[0], dict):
        raise ErasureError(f"'{path}' is not a reference checkpoint ([model state, optimizer state, ..., EMA state]).")
    # The EMA state comes last when the run kept one; the optimizer's dict (with "state") never does.
    last = states[-1]
    ema = last if len(states) > 1 and isinstance(last, dict) and "state" not in last else None
    return states[0], ema


def import_reference(config: Config, checkpoint: str | Path) -> Path:
    """Make ``checkpoint`` (a reference ``ckpt.pth``) the finished base DDPM of ``config``; returns its folder.

    The config's model settings must describe the checkpoint's UNet (``configs/cifar10.yaml``
    holds those of the reference's ``cifar10_train.yml``). Without EMA weights in the
    checkpoint, the raw ones are also the sampled model.
    """
    if config.model.conventions != "reference":
        raise ErasureError("a reference checkpoint needs the reference's UNet layout: set model.conventions=reference.")
    stage = base_stage(config)
    if stage.done():
        return stage.folder / "model"
    # Everything is read and checked before the stage folder is touched: a bad checkpoint leaves nothing behind.
    raw, ema = read_checkpoint(checkpoint)
    data = load_data(config.data, "train")  # the image shape and class count, as train_base builds the UNet
    unet = build_unet(config.model, data.shape, data.num_classes)
    states = [convert_state_dict(weights) for weights in (raw, ema or raw)]
    for state in states:
        try:
            unet.load_state_dict(state)  # strict: every name and shape must fit
        except RuntimeError as e:
            detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
            raise ErasureError(
                f"the checkpoint's UNet differs from this config's ({detail}). Set model.channels, "
                "model.layers_per_block and model.attention_resolutions to the reference run's ch * ch_mult, "
                "num_res_blocks and attn_resolutions, and data to its dataset."
            ) from None

    def work() -> dict:
        unet.load_state_dict(states[0])
        save_tensors(stage.folder / RAW_WEIGHTS, unet.state_dict())
        unet.load_state_dict(states[1])  # the EMA weights sample; without them, the raw ones
        save_model(unet, noise_scheduler(config.model.num_train_timesteps), stage.folder / "model")
        return {"imported_from": str(Path(checkpoint).resolve()), "ema": ema is not None,
                "parameters": sum(p.numel() for p in unet.parameters())}  # fmt: skip

    stage.run(config, work)
    return stage.folder / "model"
