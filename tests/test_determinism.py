"""Same config, seed and thread count -> bit-identical weights on the CPU; a diverged run is never marked done."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from erasure.cli import main
from erasure.core.errors import ErasureError
from erasure.core.loop import check_weights
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


CPU = [o for o in TINY if not o.startswith("device=")] + ["device=cpu"]


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(f).items()}
    assert out, f"no weights in {folder}"
    return out


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def test_ddpm_base_and_erasure_are_bit_identical(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert main(["train-ddpm", *CPU, f"workdir={run}"]) == 0
        assert main(["erase", *CPU, f"workdir={run}", "--method", "salun"]) == 0
    assert_identical(weights(runs[0] / "ddpm" / "model"), weights(runs[1] / "ddpm" / "model"))
    erased = [run / "erase" / "salun-forget0" for run in runs]
    assert_identical(weights(erased[0] / "model"), weights(erased[1] / "model"))
    assert_identical(load_file(erased[0] / "mask.safetensors"), load_file(erased[1] / "mask.safetensors"))
    for stage in (runs[0] / "ddpm", erased[0]):
        done = json.loads((stage / "done.json").read_text())
        assert done["seed"] == 0 and done["threads"] == 1
    # Another seed really is another start (the seed is what decides).
    # (Same settings as the runs above: zero steps is now refused, so it cannot isolate the initial weights.)
    assert main(["train-ddpm", *CPU, f"workdir={tmp_path / 'c'}", "train.seed=1"]) == 0
    other = weights(tmp_path / "c" / "ddpm" / "model")
    assert any(not torch.equal(v, weights(runs[0] / "ddpm" / "model")[k]) for k, v in other.items())


def test_judge_classifier_is_bit_identical(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert main(["train-classifier", *CPU, f"workdir={run}"]) == 0
    assert_identical(weights(runs[0] / "classifier"), weights(runs[1] / "classifier"))
    done = [json.loads((run / "classifier" / "done.json").read_text()) for run in runs]
    assert done[0]["test_accuracy"] == done[1]["test_accuracy"] and done[0]["seed"] == 0 and done[0]["threads"] == 1


def test_classification_table_is_bit_identical(tmp_path):
    from tests.test_classification import TINY_TABLE

    opts = [o for o in TINY_TABLE if not o.startswith("device=")] + ["device=cpu"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert main(["unlearn-classifier", "--workdir", str(run), *opts]) == 0
    folders = sorted(p.name for p in runs[0].iterdir() if (p / "model.safetensors").is_file())
    assert "original" in folders and "salun" in folders
    for name in folders:
        assert_identical(weights(runs[0] / name), weights(runs[1] / name))
    tables = [json.loads((run / "results.json").read_text())["table"] for run in runs]
    strip = [[{k: v for k, v in row.items() if "RTE" not in k} for row in t] for t in tables]
    assert strip[0] == strip[1]


def test_a_diverged_last_step_is_not_marked_done(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train-ddpm", *CPU, f"workdir={run}", "train.lr=1e30", "train.steps=1", "train.warmup_steps=0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "training diverged: after step 1" in err and "lower the learning rate (lr=1e+30)" in err
    assert not (run / "ddpm" / "done.json").exists() and not (run / "ddpm" / "model").exists()
    assert main(["train-classifier", *CPU, f"workdir={run}", "classifier.lr=1e30", "classifier.steps=1"]) == 2
    assert not (run / "classifier" / "done.json").exists()


def test_check_weights_names_the_weight():
    model = torch.nn.Linear(2, 2)
    check_weights(model, 3, 1e-3)  # healthy
    with torch.no_grad():
        model.bias[0] = math.nan
    with pytest.raises(ErasureError, match=r"after step 3 the weight 'bias' is not finite"):
        check_weights(model, 3, 1e-3)
    model.bias.requires_grad_(False)  # frozen weights cannot have diverged in this run
    check_weights(model, 3, 1e-3)
    with torch.no_grad():
        model.weight[0, 0] = 1e30
    with pytest.raises(ErasureError, match=r"reached \|w\| = 1e\+30"):
        check_weights(model, 3, 1e-3)
