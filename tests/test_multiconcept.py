"""Multi-concept erasure: several concept specs or classes in one run, for every SD method."""

import csv
import json

import pytest
import torch

from erasure.core.config import load_config
from erasure.core.errors import ErasureError
from erasure.core.saliency import Mask
from erasure.sd.config import ConceptConfig, ConceptSpec, SDConfig, load_concept
from erasure.sd.methods import SDContext
from erasure.sd.methods.salun import SalUnSD
from erasure.sd.methods.uce import is_uce_weight, last_token_embeddings
from erasure.sd.model import load_pipeline, load_unet, noise_scheduler
from erasure.sd.pipeline import erase
from tests.test_sd import TINY_SD

METHODS = ["salun", "esd-x", "fmn", "uce"]
MULTI = "configs/sd/concepts/nudity_van_gogh.yaml"
IMAGENETTE = "configs/sd/concepts/imagenette.yaml"


def multi_config(model, workdir, *extra) -> SDConfig:
    overrides = [*TINY_SD, "train.steps=6", f"model.pretrained={model}", f"workdir={workdir}", *extra]
    return load_config("configs/sd/multi_concept.yaml", overrides, schema=SDConfig)


# The tiny tokenizer holds 32 bytes, too few for template.yaml's prompts: a short Van Gogh spec.
VAN_GOGH = """name: van_gogh
concept: Van Gogh
forget: {prompts: [art by Van Gogh, a man by Van Gogh]}
target: {prompts: [art, a man]}
retain: {prompts: [art by Monet]}
"""


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Nudity and Van Gogh erased together by every method, in one workdir."""
    workdir = tmp_path_factory.mktemp("multi-run")
    (workdir / "van_gogh.yaml").write_text(VAN_GOGH)
    specs = f"concept.spec=[configs/sd/concepts/nudity.yaml, {workdir / 'van_gogh.yaml'}]"
    return tiny_model, workdir, {m: erase(multi_config(tiny_model, workdir, specs, f"method={m}")) for m in METHODS}


def test_the_three_ways_to_list_concepts():
    spec = load_concept(ConceptConfig(MULTI))
    listed = load_concept(ConceptConfig(["configs/sd/concepts/nudity.yaml", "configs/sd/concepts/template.yaml"]))
    assert [p.name for p in spec.concepts] == [p.name for p in listed.concepts] == ["nudity", "van_gogh"]
    assert spec.name == "nudity_van_gogh" and listed.name == "nudity+van_gogh"
    van_gogh = load_concept(ConceptConfig("configs/sd/concepts/template.yaml"))
    assert spec.forget == listed.forget == ["a photo of a nude person", *van_gogh.forget]
    assert spec.part_of("forget") == [0, 1, 1, 1] and spec.part_of("target") == [0, 1, 1, 1]
    assert spec.retain[0] == "a photo of a person wearing clothes" and len(spec.retain) == 4
    classes = load_concept(ConceptConfig(IMAGENETTE, ["church", "French horn"]))
    assert [p.concept for p in classes.concepts] == ["church", "French horn"]
    # church's target skips French horn, which is forgotten too; neither is retained
    assert classes.target == ["an image of a garbage truck", "an image of a garbage truck"]
    assert len(classes.retain) == 8 and not {"an image of a church", "an image of a French horn"} & set(classes.retain)
    one = load_concept(ConceptConfig(IMAGENETTE, ["church"]))
    assert one.parts == [] and one == load_concept(ConceptConfig(IMAGENETTE, "church")) and "parts" not in one.record()


def test_bad_concept_lists_are_clear_errors(tmp_path):
    with pytest.raises(ErasureError, match="listed twice"):
        load_concept(ConceptConfig(["configs/sd/concepts/nudity.yaml", "configs/sd/concepts/nudity.yaml"]))
    with pytest.raises(ErasureError, match="no concept spec of this run is a class set"):
        load_concept(ConceptConfig([MULTI], ["church"]))
    with pytest.raises(ErasureError, match="every class"):
        load_concept(ConceptConfig(IMAGENETTE, load_config(IMAGENETTE, schema=ConceptSpec).classes))
    with pytest.raises(ErasureError, match="not a class"):
        load_concept(ConceptConfig(IMAGENETTE, ["church", "cathedral"]))
    real = tmp_path / "real.yaml"
    real.write_text(f"name: real\nforget: {{prompts: [a cat], images: {tmp_path}}}\ntarget: {{prompts: [a dog]}}\n")
    with pytest.raises(ErasureError, match="mix generated and real forget images"):
        load_concept(ConceptConfig([str(real), "configs/sd/concepts/nudity.yaml"]))


def test_every_method_erases_both_concepts_and_says_so(runs):
    model, workdir, folders = runs
    base = load_unet(str(model))
    for method, folder in folders.items():
        done = json.loads((folder / "done.json").read_text())
        assert done["concept"] == "nudity+van_gogh" and done["concepts"] == ["nudity", "van_gogh"], method
        erased = load_unet(str(folder / "model"))
        assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), erased.parameters())), method
    # one SalUn mask, from the union forget set (generated from both concepts' prompts)
    mask = Mask.load(folders["salun"] / "mask.safetensors", base)
    assert mask.info["concept"] == "nudity+van_gogh"
    manifest = [json.loads(line) for line in (workdir / "data" / "forget" / "images" / "manifest.jsonl").read_text().splitlines()]
    assert {row["prompt"] for row in manifest} == {"a photo of a nude person", "art by Van Gogh", "a man by Van Gogh"}
    # ESD draws one concept per step: both appear in its log
    with open(folders["esd-x"] / "log.csv") as f:
        assert {float(row["concept"]) for row in csv.DictReader(f)} == {0.0, 1.0}


def test_uce_erases_both_concepts_in_one_solve_each_to_its_guide(runs):
    model, _, folders = runs
    pipe = load_pipeline(str(model))
    done = json.loads((folders["uce"] / "done.json").read_text())["uce"]
    assert done["erased"] == ["nudity", "Van Gogh"] and done["guides"] == ["", "art"] and done["preserved"] == []
    c, g = last_token_embeddings(pipe, ["nudity", "Van Gogh"]), last_token_embeddings(pipe, ["", "art"])
    edited = dict(load_unet(str(folders["uce"] / "model")).named_parameters())
    for name, w in load_unet(str(model)).named_parameters():
        if is_uce_weight(name):
            w, w2 = w.detach(), edited[name].detach()
            error = (c @ w2.T - g @ w.T).norm(dim=1) / (c @ w.T - g @ w.T).norm(dim=1)
            assert (error < 0.1).all(), (name, error)


def test_salun_steers_each_forget_prompt_to_its_own_concepts_targets(tiny_model, tmp_path):
    config = multi_config(tiny_model, tmp_path)
    concept = load_concept(config.concept)
    pipe = load_pipeline(str(tiny_model))
    ctx = SDContext(config, concept, pipe, noise_scheduler(pipe), {}, torch.zeros(1), torch.device("cpu"))
    method = SalUnSD(ctx)
    method.prepare(pipe.unet)
    g = torch.Generator().manual_seed(0)
    prompts = torch.tensor([0, 1, 2, 3] * 50)
    picked = method.target_indices(prompts, g)
    part = torch.tensor(concept.part_of("target"))[picked]
    assert torch.equal(part, torch.tensor(concept.part_of("forget"))[prompts])
    assert set(picked[prompts > 0].tolist()) == {1, 2, 3}  # uniform among Van Gogh's three targets
