"""Estimate: memory and time of one SalUn step on SDXL (1024 px) on an H100, from counts on the meta device.

Nothing here runs on a GPU. Both UNets are built from their published configs on PyTorch's
meta device (shapes only, no memory, no arithmetic), and one SalUn fine-tune step's UNet
work is traced: the no-grad target prediction, then forward and backward of the forget
and the retain term (three forwards, two backwards), each at batch ``b``.

- FLOPs: ``torch.utils.flop_counter`` over that trace (model FLOPs, as benchmarks/sd_training.py counts them).
- Time: FLOPs / the rate measured for the SD v1.4 SalUn step on an H100 (bf16 autocast,
  eager) - assumes SDXL runs at the same rate.
- Memory: the fixed part is counted per parameter (fp32 weights, gradients, AdamW's two
  moments; the mask constraint's keep-flags and saved values at ratio 0.5; bf16 text
  encoders and VAE); activations are SD v1.4's measured ones (its measured peak minus its
  fixed part) scaled by the ratio of the bytes autograd saves per image in the two traces
  (saved at batch 2 minus batch 1, which leaves out the weights autograd also saves).
  With gradient checkpointing the same ratio is taken of the checkpointed trace; the
  recomputation of one block during backward comes on top and is not counted, nor are
  the recomputation's FLOPs (about a third more compute).

SD v1.4 at 512 px, batch 8 is traced too: its FLOP count must reproduce the measured one
(45.9 TFLOP), which checks the trace. Runs on a CPU in about a minute:

    python benchmarks/sdxl_estimate.py
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from common import SDXL_TEXT_2_CONFIG, SDXL_UNET_CONFIG, TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, machine
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from erasure.core.io import write_json

# The measured reference (benchmarks/sd_training.py on one H100, bf16 autocast, eager, no checkpointing):
# the SD v1.4 SalUn step at 512 px, batch 8.
SD14_MEASURED = {"tflop": 45.9, "tflops_per_s": 137.0, "peak_gib": 30.5, "batch": 8, "resolution": 512}
GIB = 2**30


class SavedAttention(torch.autograd.Function):
    """Fused attention's memory footprint on the meta device: saves q, k, v, the output and a log-sum-exp row.

    On meta, SDPA decomposes into the math path, which would save the full attention matrix;
    the flash / memory-efficient kernels an H100 runs do not.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def unet_inputs(config: dict, batch: int, latent: int) -> dict:
    """Meta tensors for one UNet call: latents, timesteps and the conditioning the config expects."""
    tokens, width = 77, config["cross_attention_dim"]
    inputs = {
        "sample": torch.empty(batch, 4, latent, latent, device="meta"),
        "timestep": torch.zeros(batch, dtype=torch.long, device="meta"),
        "encoder_hidden_states": torch.empty(batch, tokens, width, device="meta"),
    }
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta"),
            "time_ids": torch.empty(batch, 6, device="meta"),
        }
    return inputs


def salun_step(unet: torch.nn.Module, config: dict, batch: int, latent: int) -> None:
    """The UNet work of one SalUn fine-tune step: target (no grad), forget and retain forward + backward."""
    with torch.no_grad():
        unet(**unet_inputs(config, batch, latent))
    for _ in ("forget", "retain"):
        unet(**unet_inputs(config, batch, latent)).sample.sum().backward()


def saved_bytes(unet: torch.nn.Module, config: dict, batch: int, latent: int) -> int:
    """Bytes autograd saves for backward in one forward with grad (fp32; the forget and retain terms each hold one, in turn)."""
    saved = []
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **_: SavedAttention.apply(q, k, v)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel() * t.element_size()), t)[1], lambda t: t):
            unet(**unet_inputs(config, batch, latent))
    finally:
        F.scaled_dot_product_attention = sdpa
    return sum(saved)


def trace(config: dict, batch: int, resolution: int) -> dict:
    """FLOPs of one SalUn step, the activation bytes autograd saves per image, and the UNet's parameter count."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    latent = resolution // 8
    with FlopCounterMode(display=False) as counter:
        salun_step(unet, config, batch, latent)
    per_image = saved_bytes(unet, config, 2, latent) - saved_bytes(unet, config, 1, latent)
    unet.enable_gradient_checkpointing()
    unet.train()  # diffusers checkpoints only in training mode
    checkpointed = saved_bytes(unet, config, 2, latent) - saved_bytes(unet, config, 1, latent)
    return {
        "parameters": count(unet),
        "flop": counter.get_total_flops(),
        "saved_bytes_per_image": per_image,
        "checkpointed_saved_bytes_per_image": checkpointed,
    }


def fixed_bytes(unet_params: int, frozen_params: int, mask: bool) -> int:
    """Weights, gradients and AdamW moments of the fp32 UNet (16 B/param), the mask constraint, bf16 frozen parts."""
    per_param = 16 + (1 + 0.5 * 4 if mask else 0)  # keep-flag (bool) and the saved masked-out half (fp32)
    return int(unet_params * per_param + 2 * frozen_params)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    with torch.device("meta"):
        vae = count(AutoencoderKL(**VAE_CONFIG))
        text_1 = count(CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)))
        text_2 = count(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2_CONFIG)))
    ref = SD14_MEASURED
    sd14 = trace(UNET_CONFIG, ref["batch"], ref["resolution"])
    print(f"SD v1.4 UNet {sd14['parameters'] / 1e6:.1f}M, b{ref['batch']} {ref['resolution']} px: {sd14['flop'] / 1e12:.2f} TFLOP")
    # The benchmark's peak had no mask; its frozen parts: VAE and one text encoder in bf16.
    activations_sd14 = ref["peak_gib"] * GIB - fixed_bytes(sd14["parameters"], vae + text_1, mask=False)
    rows = []
    for batch in (1, 2, 4, 8):
        xl = trace(SDXL_UNET_CONFIG, batch, 1024)
        per_counted_byte = activations_sd14 / (ref["batch"] * sd14["saved_bytes_per_image"])
        activations = per_counted_byte * batch * xl["saved_bytes_per_image"]
        checkpointed = per_counted_byte * batch * xl["checkpointed_saved_bytes_per_image"]
        fixed = fixed_bytes(xl["parameters"], vae + text_1 + text_2, mask=True)
        rows.append(
            {
                "batch_size": batch,
                "resolution": 1024,
                "tflop_per_step": round(xl["flop"] / 1e12, 2),
                "seconds_per_step_at_reference_rate": round(xl["flop"] / (ref["tflops_per_s"] * 1e12), 3),
                "fixed_gib": round(fixed / GIB, 1),
                "activations_gib": round(activations / GIB, 1),
                "peak_gib": round((fixed + activations) / GIB, 1),
                "checkpointed_activations_gib": round(checkpointed / GIB, 1),
                "checkpointed_peak_gib": round((fixed + checkpointed) / GIB, 1),
            }
        )
        print(rows[-1], flush=True)
    result = {
        "benchmark": "sdxl_estimate",
        "kind": "ESTIMATE from meta-device counts, not a measurement",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(("torch", "diffusers", "transformers")),
        "reference": ref,
        "sd14_trace": {**sd14, "tflop": round(sd14["flop"] / 1e12, 2), "activations_gib_measured": round(activations_sd14 / GIB, 2)},
        "sdxl_unet_parameters": xl["parameters"],
        "sdxl_text_encoder_parameters": [text_1, text_2],
        "vae_parameters": vae,
        "sdxl_salun_step": rows,
    }
    write_json(Path(__file__).parent / "results" / "sdxl_estimate.json", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "sdxl_salun_step")}, indent=1))


if __name__ == "__main__":
    main()
