"""The DDPM path end to end on the embedded digits, at a size that runs in seconds."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from erasure.cli import main
from erasure.core.io import load_tensors
from erasure.core.saliency import Mask
from erasure.ddpm.model import load_unet
from erasure.ddpm.pipeline import RAW_WEIGHTS
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # trains a base model and five erasures through the CLI (`make test-fast` skips it)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with a trained tiny base model and classifier, erased with every method."""
    workdir = tmp_path_factory.mktemp("e2e") / "run"
    args = [*TINY, f"workdir={workdir}"]
    assert main(["train-ddpm", *args]) == 0
    assert main(["train-classifier", *args]) == 0
    assert main(["erase", "--method", "salun", "--method", "rl", "--method", "random", "--method", "esd", "--method", "ga", *args]) == 0
    return workdir, args


def test_stage_outputs(run):
    workdir, _ = run
    model = workdir / "ddpm" / "model"
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"):
        assert (model / name).is_file()
    for stage in ("ddpm", "classifier", "erase/salun-forget0"):
        assert (workdir / stage / "config.yaml").is_file()
        assert (workdir / stage / "done.json").is_file()
        assert not (workdir / stage / "checkpoint").exists()  # dropped once finished
    assert "test_accuracy" in json.loads((workdir / "classifier" / "done.json").read_text())
    log = (workdir / "erase" / "salun-forget0" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,lr,forget,retain")


@pytest.mark.parametrize("method", ["salun", "random"])
def test_masked_methods_leave_masked_out_weights_bit_identical(run, method):
    workdir, _ = run
    base = load_unet(workdir / "ddpm" / "model")
    base.load_state_dict(load_tensors(workdir / "ddpm" / RAW_WEIGHTS))  # erasure starts from the raw weights, as the reference
    erased = load_unet(workdir / "erase" / f"{method}-forget0" / "model")
    mask = Mask.load(workdir / "erase" / f"{method}-forget0" / "mask.safetensors", base)
    assert mask.kept_fraction == pytest.approx(0.5, abs=1 / sum(t.numel() for t in mask.tensors.values()))
    changed = 0
    for (n, b), e in zip(base.named_parameters(), erased.parameters()):
        keep = mask.tensors[n]
        assert torch.equal(b[~keep], e[~keep]), n
        changed += int((b[keep] != e[keep]).sum())
    assert changed > 0


def test_salun_and_random_masks_differ(run):
    workdir, _ = run
    salun = Mask.load(workdir / "erase" / "salun-forget0" / "mask.safetensors")
    random = Mask.load(workdir / "erase" / "random-forget0" / "mask.safetensors")
    assert salun.info["loss"] == "ddpm-guided-mse" and random.info["loss"] == "random"
    assert any(not torch.equal(salun.tensors[n], random.tensors[n]) for n in salun.tensors)


@pytest.mark.parametrize("method", ["rl", "esd", "ga"])
def test_unmasked_methods_train_and_save_no_mask(run, method):
    workdir, _ = run
    folder = workdir / "erase" / f"{method}-forget0"
    assert not (folder / "mask.safetensors").exists()
    base, erased = load_unet(workdir / "ddpm" / "model"), load_unet(folder / "model")
    assert any(not torch.equal(b, e) for b, e in zip(base.parameters(), erased.parameters()))


def test_mask_command_reproduces_the_erasure_mask(run, tmp_path):
    workdir, args = run
    out = tmp_path / "mask.safetensors"
    assert main(["mask", "--out", str(out), *args]) == 0
    again = Mask.load(out)
    used = Mask.load(workdir / "erase" / "salun-forget0" / "mask.safetensors")
    assert all(torch.equal(again.tensors[n], used.tensors[n]) for n in used.tensors)


def test_evaluate_writes_report_grid_and_resumes_from_cached_samples(run, capsys):
    workdir, args = run
    assert main(["evaluate", "--method", "salun", "--method", "esd", *args]) == 0
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert list(report["models"]) == ["original", "salun", "esd"]
    for scores in report["models"].values():
        assert 0 <= scores["ua"] <= 1 and 0 <= scores["retained_accuracy"] <= 1
        assert scores["fid_retained"] >= 0 and len(scores["per_class_accuracy"]) == 10
    assert report["fid_features"] in ("classifier-features", "inception-2048")
    # every result names how its images were sampled
    sampling = report["protocol"]["sampling"]
    assert {k: sampling[k] for k in ("protocol", "sampler", "steps", "eta", "guidance")} == {
        "protocol": "fast",
        "sampler": "ddim",
        "steps": 4,
        "eta": 0.0,
        "guidance": 2.0,
    }
    assert "| original |" in (workdir / "eval" / "report.md").read_text()
    grid = Image.open(workdir / "eval" / "grid.png")
    assert grid.width > grid.height / 10 * 2  # 3 columns of 2 images beside 10 rows
    cached = {p.name: p.stat().st_mtime_ns for p in (workdir / "eval" / "samples").iterdir()}
    assert set(cached) == {"original.safetensors", "salun.safetensors", "esd.safetensors"}
    assert main(["evaluate", "--method", "salun", "--method", "esd", *args]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (workdir / "eval" / "samples").iterdir()} == cached  # nothing regenerated
    again = json.loads((workdir / "eval" / "report.json").read_text())
    assert again["models"] == report["models"]

    # Rows accumulate per method: evaluating rl keeps salun's and esd's rows.
    assert main(["evaluate", "--method", "rl", *args]) == 0
    grown = json.loads((workdir / "eval" / "report.json").read_text())
    assert list(grown["models"]) == ["original", "salun", "esd", "rl"]
    assert grown["models"]["salun"] == report["models"]["salun"]
    assert "| esd |" in (workdir / "eval" / "report.md").read_text()
    # `erasure report` shows the DDPM table beside any audits.
    assert main(["report", str(workdir / "eval")]) == 0
    assert "| salun |" in (workdir / "eval" / "summary.md").read_text()
    # A finished erasure is judged as it was made: erase settings need not be repeated.
    assert main(["evaluate", "--method", "salun", *args, "unlearn.alpha=3", "unlearn.checkpoint_every=1"]) == 0
    # Evaluation-only settings may change freely on finished erasures; another protocol replaces the rows.
    assert main(["evaluate", "--method", "salun", *args, "sample.steps=3"]) == 0
    replaced = json.loads((workdir / "eval" / "report.json").read_text())
    assert list(replaced["models"]) == ["original", "salun"] and replaced["protocol"]["sampling"]["steps"] == 3


def test_finished_stages_are_reused_and_changed_settings_refused(run, capsys):
    workdir, args = run
    weights = workdir / "erase" / "salun-forget0" / "model" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert main(["erase", *args]) == 0
    assert weights.stat().st_mtime_ns == before
    # `--method rl` and `unlearn.method=rl` name the same run.
    rl_weights = workdir / "erase" / "rl-forget0" / "model" / "diffusion_pytorch_model.safetensors"
    rl_before = rl_weights.stat().st_mtime_ns
    assert main(["erase", *args, "unlearn.method=rl"]) == 0
    assert rl_weights.stat().st_mtime_ns == rl_before
    capsys.readouterr()
    assert main(["erase", *args, "unlearn.alpha=0.5"]) == 2
    assert "different settings" in capsys.readouterr().err


def test_user_errors_exit_cleanly(tmp_path, capsys):
    args = [*TINY, f"workdir={tmp_path}"]
    assert main(["erase", *args]) == 2
    assert "run `erasure train-ddpm`" in capsys.readouterr().err
    assert main(["erase", "--method", "nope", *args]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["evaluate", *args]) == 2
    assert "no finished base model" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    """Every stage in one process, in bf16 as 'auto' picks on a GPU (a bf16 stage then an fp32 one once crashed there)."""
    workdir = tmp_path / "demo"
    assert main(["demo", *TINY, f"workdir={workdir}", "mixed_precision=bf16"]) == 0
    out = capsys.readouterr().out
    assert "| salun |" in out and "report:" in out
    for path in ("eval/grid.png", "eval/report.json", "eval/report.md", "erase/salun-forget0/mask.safetensors"):
        assert (workdir / path).is_file(), path
    assert Path(workdir / "erase" / "salun-forget0" / "config.yaml").read_text().startswith("workdir:")


def test_bad_models_and_classes_are_clear_errors(run, tmp_path, capsys):
    import shutil

    from erasure.core.errors import ErasureError

    workdir, args = run
    corrupt = tmp_path / "model"
    shutil.copytree(workdir / "ddpm" / "model", corrupt)
    weights = corrupt / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ErasureError, match="could not load the UNet"):
        load_unet(corrupt)
    with pytest.raises(ErasureError, match="holds no UNet"):
        load_unet(tmp_path)
    capsys.readouterr()
    assert main(["erase", *args, "unlearn.forget_class=12"]) == 2
    assert "not a class of digits" in capsys.readouterr().err
