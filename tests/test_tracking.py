import csv
import importlib.util

import pytest
import torch

from erasure.core.errors import ErasureError
from erasure.core.loop import LoopSettings, make_accelerator, train
from erasure.core.saliency import Mask
from erasure.core.tracking import flat_values, parse_log_with
from tests.conftest import DEVICE, TINY
from tests.test_loop import make_step_loss, net

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under ``folder`` (the run's own, not the hparams one)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_what_log_csv_gets(tmp_path):
    accelerator = make_accelerator(DEVICE, log_with="tensorboard")
    mask = Mask.random(net(), 0.5, seed=1)
    settings = LoopSettings(steps=6, lr=1e-2, grad_clip=None, log_every=2)
    train(net(), make_step_loss(), settings, tmp_path, accelerator, constraint_mask=mask)

    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]
    logged = scalars(tmp_path / "tensorboard")
    for key in ("loss", "lr", "grad_norm"):
        assert logged[key] == [(int(r["step"]), pytest.approx(float(r[key]), rel=1e-6)) for r in rows], key
    assert all(float(r["grad_norm"]) > 0 for r in rows)
    assert logged["mask_kept_fraction"] == [(0, pytest.approx(mask.kept_fraction, rel=1e-6))]


def test_no_tracker_writes_nothing(tmp_path):
    train(net(), make_step_loss(), LoopSettings(steps=2, lr=1e-2), tmp_path, make_accelerator(DEVICE))
    assert not (tmp_path / "tensorboard").exists()
    assert "grad_norm" in (tmp_path / "log.csv").read_text().splitlines()[0]


def test_log_with_is_checked():
    assert parse_log_with("none") == () and parse_log_with(None) == ()
    assert parse_log_with("TensorBoard, none") == ("tensorboard",)
    with pytest.raises(ErasureError, match="not a tracker"):
        parse_log_with("tensorbored")
    if importlib.util.find_spec("wandb") is None:  # W&B is optional: without it, a clear error before any work
        with pytest.raises(ErasureError, match="pip install wandb"):
            parse_log_with("wandb")
    else:
        assert parse_log_with("wandb,tensorboard") == ("wandb", "tensorboard")


def test_hparams_are_flat_scalars():
    assert flat_values({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": True}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None", "e": True}


def test_ddpm_classifier_stage_logs_to_tensorboard(tmp_path):
    from erasure.ddpm.config import load
    from erasure.ddpm.pipeline import train_judge

    config = load(overrides=[*TINY, f"workdir={tmp_path}", "log_with=tensorboard", "classifier.steps=12"])
    folder = train_judge(config)
    logged = scalars(folder / "tensorboard")
    assert [s for s, _ in logged["loss"]] == [0, 10, 11]
    assert torch.isfinite(torch.tensor([v for _, v in logged["grad_norm"]])).all()


def test_wandb_offline_gets_the_loop_s_scalars(tmp_path, monkeypatch):
    """W&B (when installed) in offline mode: the run folder holds the logged loss, with no network."""
    pytest.importorskip("wandb")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = LoopSettings(steps=4, lr=1e-2, log_every=2)
    train(net(), make_step_loss(), settings, tmp_path, make_accelerator(DEVICE, log_with="wandb"))
    import wandb

    wandb.teardown()  # W&B's service writes asynchronously; this waits for it (at exit it happens by itself)
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # one offline run, in the stage folder (upload later with `wandb sync`)
    # The offline record stores each value as JSON text: every logged loss and grad norm is in it.
    record = runs[0].read_bytes()
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    for row in rows:
        for key in ("loss", "grad_norm"):
            assert repr(float(row[key])).encode() in record, (key, row["step"])
