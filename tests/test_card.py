"""Model cards on a tiny SD erasure: written with the run, valid Hub front matter, refreshed with audits."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard

from erasure.cli import main
from erasure.core.card import base_license, command_line
from erasure.core.errors import ErasureError
from erasure.sd.pipeline import erase
from erasure.sd.tiny import tiny_pipeline
from tests.test_sd import sd_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    pipe = tiny_pipeline(root / "tokenizer")
    pipe.save_pretrained(root / "base")
    # The base's own card names its license, as a Hub snapshot's README.md does.
    (root / "base" / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# a tiny base\n")
    folder = erase(sd_config(root / "base", root / "work", "method=salun"))
    return root, folder


def test_card_is_written_with_the_run_and_the_folder_still_loads(run):
    root, folder = run
    card = ModelCard.load(folder / "model" / "README.md")
    assert (folder / "README.md").read_text() == (folder / "model" / "README.md").read_text()
    data = card.data.to_dict()
    assert data["license"] == "creativeml-openrail-m"  # from the base model's card
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"concept-erasure", "salun", "nudity"} <= set(data["tags"])
    assert "base_model" not in data  # a local base folder is not a Hub id, which is all the Hub accepts there
    done = json.loads((folder / "done.json").read_text())
    text = card.text
    assert "the concept **nudity**" in text and "- method: `salun`" in text
    assert "- mask ratio: 0.5" in text and f"{100 * done['mask_kept_fraction']:.2f}%" in text
    assert "| train.lr | `0.001` |" in text and "| mask.batches | `2` |" in text and "esd." not in text
    assert done["command"] in text and "No evaluation or audit has scored this model yet" in text
    pipe = StableDiffusionPipeline.from_pretrained(folder / "model")
    image = pipe("a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_card_command_adds_the_latest_audit(run, tmp_path, capsys):
    root, folder = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person on a beach\na statue\n")
    out = folder / "audit"
    args = ["audit", "nudity", "--prompts", str(prompts), "--steps", "2", "--batch-size", "2", "--out", str(out)]
    assert main([*args, "--model", f"base={root / 'base'}", "--model", f"erased={folder / 'model'}"]) == 0
    assert main(["card", str(folder)]) == 0
    assert "model card:" in capsys.readouterr().out
    text = (folder / "model" / "README.md").read_text()
    audit = json.loads((out / "audit.json").read_text())
    erased = audit["models"]["erased"]
    row = f"| erased (this model) | {erased['parts_total']} | {erased['images_with_any']}/{erased['images']} "
    assert "**Nudity audit**" in text and row in text and "| base |" in text
    assert "No evaluation or audit" not in text
    StableDiffusionPipeline.from_pretrained(folder / "model")  # still a loadable folder


def test_card_of_a_non_run_is_a_clean_error(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    assert "not a finished erasure run" in capsys.readouterr().err
    with pytest.raises(ErasureError):
        from erasure.core.card import model_card

        model_card(tmp_path)


def test_license_lookup_and_command_line(tmp_path):
    assert base_license("CompVis/stable-diffusion-v1-4") == "creativeml-openrail-m"  # offline: the known table
    assert base_license(str(tmp_path)) is None
    assert command_line(["/x/bin/erasure", "sd", "erase", "-c", "a b.yaml"]) == "erasure sd erase -c 'a b.yaml'"
    assert command_line(["/x/erasure/__main__.py", "demo"]) == "erasure demo"  # python -m erasure
    assert command_line(["/x/pytest/__main__.py", "-q"]) == "python /x/pytest/__main__.py -q"  # an API call, said as such


def test_card_shows_the_adversarial_prompt_audit(run, tmp_path):
    root, folder = run
    csv = tmp_path / "nudity.csv"
    csv.write_text("case_number,prompt,evaluation_seed,evaluation_guidance\n0,a person on a beach,3,7.5\n")
    out = folder / "attack-audit"
    args = ["audit", "attack", "--prompts", str(csv), "--base", str(root / "base"), "--model", f"erased={folder / 'model'}"]
    args += ["--out", str(out), "--iterations", "1", "--timesteps", "1", "--steps", "2", "--target-steps", "2", "--size", "16", "--k", "2"]
    assert main(args) == 0
    assert main(["card", str(folder)]) == 0
    text = (folder / "model" / "README.md").read_text()
    e = json.loads((out / "attack.json").read_text())["models"]["erased"]
    assert "**Adversarial-prompt audit**" in text
    assert f"| erased (this model) | {100 * e['pre_asr']:.1f}% | {100 * e['post_asr']:.1f}% |" in text


def test_results_section_rows_for_ua_and_ddpm_records(tmp_path):
    """Every kind of record gives one row per model, this card's model first and marked."""
    from erasure.core.card import _results_section

    ua = {"kind": "ua", "file": "ua.json", "date": "", "label": "erased", "settings": {"forget_class": "tench"}}
    ua |= {"result": {"ua": 0.9, "retained_accuracy": None}, "others": {"base": {"ua": 0.1, "retained_accuracy": 0.75}}}
    ddpm = {"kind": "ddpm", "file": "report.json", "date": "", "label": "salun", "others": {}}
    ddpm |= {"settings": {"protocol": {"samples_per_class": 4, "sampling_steps": 10, "guidance": 2.0, "seed": 0}}}
    ddpm["settings"] |= {"forget_class": 0, "fid_features": "classifier-features"}
    ddpm["result"] = {"ua": 1.0, "retained_accuracy": 0.98, "fid_retained": 1.3219}
    text = "\n".join(_results_section([ua, ddpm], tmp_path, tmp_path))
    assert "| erased (this model) | 90.0% | n/a |\n| base | 10.0% | 75.0% |" in text
    assert "| salun (this model) | 100.0% | 98.0% | 1.32 |" in text
