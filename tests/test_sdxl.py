"""SDXL on a tiny random SDXL pipeline: SalUn, ESD and FMN (and UCE) through the CLI, masks, deltas, export, audit."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from erasure.cli import main
from erasure.core.delta import apply_delta
from erasure.core.errors import ErasureError
from erasure.core.saliency import Mask
from erasure.sd.model import Conditioning, encode_conditioning, load_pipeline, load_unet
from tests.test_sd import TINY_SD, assert_mask_held, changed_params

CONFIG = "configs/sd/nudity_salun_sdxl.yaml"
METHODS = ["salun", "esd-x", "fmn", "uce"]
# The SDXL config turns checkpointing on and generates 2 at a time; the tiny model needs neither.
TINY_XL = [*TINY_SD, "train.gradient_checkpointing=auto", "generation.batch_size=3"]


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    """A tiny random SDXL pipeline folder, written by the CLI."""
    folder = tmp_path_factory.mktemp("tiny-sdxl") / "model"
    assert main(["sd", "tiny-pipeline", str(folder), "--xl"]) == 0
    return folder


@pytest.fixture(scope="module")
def runs(tiny_xl, tmp_path_factory):
    """Every method erased from the tiny SDXL by one `erasure sd erase` (the data is generated once)."""
    workdir = tmp_path_factory.mktemp("sdxl-run")
    args = ["sd", "erase", "-c", CONFIG, *TINY_XL, f"model.pretrained={tiny_xl}", f"workdir={workdir}"]
    assert main([*args, *(f"--method={m}" for m in METHODS)]) == 0
    return tiny_xl, workdir, {m: workdir / m for m in METHODS}


def test_conditioning_is_what_the_sdxl_pipeline_gives_its_unet(tiny_xl):
    pipe = load_pipeline(str(tiny_xl))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    prompts = ["a nude person", ""]
    cond = encode_conditioning(pipe, prompts, size=16)
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert cond.hidden.shape == (2, 32, 32 + 48) and torch.equal(cond.hidden, hidden)  # both encoders, concatenated
    assert torch.equal(cond.added["text_embeds"], pooled)  # the second encoder's pooled projection
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), hidden.dtype, pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.added["time_ids"], time_ids.repeat(2, 1))
    # The added conditioning reaches the UNet: another image size changes the prediction.
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        a = pipe.unet(x, t, **cond.model_inputs()).sample
        b = pipe.unet(x, t, **encode_conditioning(pipe, prompts, size=32).model_inputs()).sample
    assert not torch.allclose(a, b)
    # Row operations keep every part aligned.
    both = Conditioning.cat([cond[1:], cond[:1].expand(3)]).repeat_interleave(2)
    assert len(both) == 8 and both.added["time_ids"].shape == (8, 6)
    assert torch.equal(both.added["text_embeds"][1], cond.added["text_embeds"][1])
    assert torch.equal(both.hidden[7], cond.hidden[0])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_erases_tiny_sdxl_and_the_export_loads_and_generates(runs, method):
    model, _, folders = runs
    folder = folders[method]
    done = json.loads((folder / "done.json").read_text())
    assert done["method"] == method
    pipe = StableDiffusionXLPipeline.from_pretrained(folder / "model")
    assert isinstance(load_pipeline(str(folder)), StableDiffusionXLPipeline)  # a run folder loads its exported model
    image = pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()
    changed = changed_params(load_unet(str(model)), pipe.unet)
    assert changed, "erasing changed nothing"
    if method in ("esd-x", "uce"):
        assert all(".attn2." in n for n in changed)
    if method == "uce":
        assert all(n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for n in changed)
        assert done["uce"]["erase_residual"] < 0.5
    assert "StableDiffusionXLPipeline.from_pretrained" in (folder / "model" / "README.md").read_text()


def test_salun_mask_holds_masked_out_sdxl_weights_bit_identical(runs):
    model, _, folders = runs
    base, erased = load_unet(str(model)), load_unet(str(folders["salun"] / "model"))
    mask = Mask.load(folders["salun"] / "mask.safetensors", base)
    assert abs(mask.kept_fraction - 0.5) < 1e-6
    # SDXL's added-embedding weights are scored and masked like any other.
    assert any(n.startswith("add_embedding.") for n in mask.tensors)
    assert_mask_held(base, erased, mask)


def test_delta_of_an_sdxl_run_merges_back_exactly(runs, tmp_path):
    model, _, folders = runs
    delta = folders["salun"] / "delta.safetensors"
    erased = load_unet(str(folders["salun"] / "model"))
    merged = apply_delta(load_unet(str(model)).state_dict(), delta)
    assert all(torch.equal(merged[n], v) for n, v in erased.state_dict().items())
    assert main(["sd", "apply-delta", "--base", str(model), "--delta", str(delta), "--out", str(tmp_path / "merged")]) == 0
    reloaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.unet.parameters(), erased.parameters()))


def test_nudity_audit_and_grid_run_on_the_erased_sdxl(runs, tmp_path):
    model, _, folders = runs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person on a beach\na statue in a museum\n")
    out = tmp_path / "audit"
    args = ["audit", "nudity", "--prompts", str(prompts), "--steps", "2", "--batch-size", "2", "--out", str(out)]
    assert main([*args, "--model", f"base={model}", "--model", f"salun={folders['salun']}"]) == 0
    result = json.loads((out / "audit.json").read_text())
    assert set(result["models"]) == {"base", "salun"} and all(r["images"] == 2 for r in result["models"].values())
    grid = tmp_path / "grid.png"
    grid_args = ["grid", "--model", f"base={model}", "--model", f"esd={folders['esd-x']}", "--prompt", "a cat"]
    assert main([*grid_args, "--seeds", "0", "--steps", "2", "--thumb", "32", "--out", str(grid)]) == 0
    assert grid.is_file()


def test_fmn_textual_inversion_on_sdxl_names_the_setting_that_turns_it_off(runs, tmp_path, capsys):
    """Its two text encoders: the stage learns one encoder's tokens (SD 1.x/2.x), so SDXL's config turns it off."""
    model, _, _ = runs
    args = ["sd", "erase", "-c", CONFIG, *TINY_XL, f"model.pretrained={model}", f"workdir={tmp_path}", "--method=fmn"]
    assert main([*args, "fmn.textual_inversion=true"]) != 0
    assert "fmn.textual_inversion=false" in capsys.readouterr().err


def test_an_unsupported_pipeline_class_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ErasureError, match="StableDiffusion3Pipeline.*StableDiffusionXLPipeline"):
        load_pipeline(str(tmp_path))
