"""UCE: the closed-form cross-attention edit, on a tiny random pipeline and on random matrices."""

import json

import pytest
import torch

from erasure.cli import main
from erasure.core.config import load_config
from erasure.core.delta import apply_delta
from erasure.core.errors import ErasureError
from erasure.sd.config import SDConfig, load_concept
from erasure.sd.methods.uce import closed_form_edit, is_uce_weight, last_token_embeddings
from erasure.sd.model import encode_prompts, load_pipeline, load_unet
from erasure.sd.pipeline import erase
from tests.conftest import DEVICE

SETTINGS = [f"device={DEVICE}"]


def uce_config(model, workdir, *extra) -> SDConfig:
    overrides = [*SETTINGS, f"model.pretrained={model}", f"workdir={workdir}", *extra]
    return load_config("configs/sd/nudity_uce.yaml", overrides, schema=SDConfig)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(str(tiny_model))


def projections(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in unet.named_parameters() if is_uce_weight(n)}


def test_the_edit_maps_the_concept_onto_the_guide_keeps_the_preserved_and_nothing_else(tiny_model, pipe, tmp_path):
    preserve = ["a photo of a person wearing clothes", "a red car"]
    folder = erase(uce_config(tiny_model, tmp_path, f"uce.preserve={json.dumps(preserve)}"))
    base, edited = load_unet(str(tiny_model)), load_unet(str(folder / "model"))
    c, g = last_token_embeddings(pipe, ["nudity"]), last_token_embeddings(pipe, [""])
    p = last_token_embeddings(pipe, preserve)
    new = dict(edited.named_parameters())
    edited_names = set()
    for name, w in base.named_parameters():
        if not is_uce_weight(name):
            assert torch.equal(w, new[name]), f"{name} changed"
            continue
        edited_names.add(name)
        w2 = new[name].detach()
        # the erased concept now gives (almost) what the empty prompt gave before
        assert (c @ w2.T - g @ w.T).norm() < 0.05 * (c @ w.T - g @ w.T).norm(), name
        # the preserved prompts' outputs move far less than the erased concept's
        assert (p @ w2.T - p @ w.T).norm() < 0.1 * (c @ w2.T - c @ w.T).norm(), name
    # every cross-attention key and value projection: 4 attn2 layers in the tiny UNet
    assert len(edited_names) == 8 and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in edited_names)
    done = json.loads((folder / "done.json").read_text())
    assert done["method"] == "uce" and done["concepts"] == ["nudity"]
    assert done["uce"]["erased"] == ["nudity"] and done["uce"]["guides"] == [""] and done["uce"]["preserved"] == preserve
    assert done["uce"]["edited_matrices"] == 8 and done["uce"]["erase_residual"] < 0.05
    assert not (folder / "checkpoint").exists()


def test_the_uce_delta_round_trips_and_the_model_generates(tiny_model, tmp_path):
    args = ["sd", "erase", "-c", "configs/sd/nudity_uce.yaml", *SETTINGS, f"model.pretrained={tiny_model}", f"workdir={tmp_path}"]
    assert main(args) == 0
    folder = tmp_path / "uce"
    base, edited = load_unet(str(tiny_model)), load_unet(str(folder / "model"))
    merged = apply_delta(base.state_dict(), folder / "delta.safetensors")
    assert all(torch.equal(merged[n], v) for n, v in edited.state_dict().items())
    generator = torch.Generator().manual_seed(0)
    image = load_pipeline(str(folder))("a photo", num_inference_steps=2, generator=generator, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    stamp = (folder / "done.json").stat().st_mtime_ns  # a finished edit is reused, not redone
    assert main(args) == 0
    assert (folder / "done.json").stat().st_mtime_ns == stamp


def test_closed_form_is_the_minimiser_of_the_uce_objective():
    g = torch.Generator().manual_seed(0)
    w, c, t, p = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(6, 5), (2, 5), (2, 5), (2, 5)])
    lamb, se, sp = 0.5, 1.0, 0.3
    w2 = closed_form_edit(w, c, t, p, lamb, se, sp)
    # the gradient of lamb|W'-W|^2 + se sum|W'c - W t|^2 + sp sum|W'p - W p|^2 vanishes at W'
    grad = lamb * (w2 - w) + se * (c @ w2.T - t @ w.T).T @ c + sp * (p @ w2.T - p @ w.T).T @ p
    assert grad.abs().max() < 1e-10
    # one concept, nothing preserved: W'c = (lamb W c + |c|^2 W t) / (lamb + |c|^2)
    one = closed_form_edit(w, c[:1], t[:1], c.new_zeros(0, 5), lamb, 1.0, 1.0)
    n2 = float(c[0] @ c[0])
    assert torch.allclose(one @ c[0], (lamb * w @ c[0] + n2 * w @ t[0]) / (lamb + n2))
    assert one.dtype == w.dtype


def test_each_prompt_is_its_last_token_and_the_empty_prompt_its_start_token(pipe):
    full = encode_prompts(pipe, ["", "ab", "nudity"])
    last = last_token_embeddings(pipe, ["", "ab", "nudity"])
    # byte tokens: <start> a b</w> <end>  and  <start> n u d i t y</w> <end>
    assert torch.equal(last[0], full[0, 0]) and torch.equal(last[1], full[1, 2]) and torch.equal(last[2], full[2, 6])


def test_options_to_v_only_spec_preserve_guides_and_templates(tiny_model, pipe, tmp_path):
    base = projections(load_unet(str(tiny_model)))
    only_v = projections(load_unet(str(erase(uce_config(tiny_model, tmp_path / "v", "uce.with_to_k=false")) / "model")))
    changed = {n for n in base if not torch.equal(base[n], only_v[n])}
    assert changed and all(".to_v." in n for n in changed) and len(changed) == 4
    # preserve: null keeps the concept spec's retain prompts; templates add erase prompts
    folder = erase(uce_config(tiny_model, tmp_path / "spec", "uce.preserve=null", "uce.guide=a person", 'uce.templates=["photo of {}"]'))
    done = json.loads((folder / "done.json").read_text())["uce"]
    assert done["preserved"] == load_concept(uce_config(tiny_model, tmp_path).concept).retain
    assert done["erased"] == ["nudity", "photo of nudity"] and done["guides"] == ["a person", "a person"]
    with pytest.raises(ErasureError, match="one guide for all or one per concept"):
        erase(uce_config(tiny_model, tmp_path / "bad", "uce.guide=[a, b]"))
