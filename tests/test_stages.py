"""The one stage lifecycle: derived fingerprints, reuse, and clear errors for foreign runs."""

import json

import pytest

from erasure.core.config import load_config
from erasure.core.errors import ErasureError
from erasure.core.stages import Stage, config_fingerprint
from erasure.ddpm.config import Config, load
from erasure.ddpm.pipeline import erase_stage
from erasure.sd.config import SDConfig, load_concept
from erasure.sd.pipeline import method_stage


def sd(*overrides: str) -> SDConfig:
    return load_config("configs/sd/nudity_salun.yaml", list(overrides), schema=SDConfig)


def test_sd_fingerprint_covers_own_settings_not_other_methods():
    concept = load_concept(sd().concept)
    base = method_stage(sd(), concept).fingerprint
    assert method_stage(sd("mask.ratio=0.3"), concept).fingerprint != base  # SalUn's own section
    assert method_stage(sd("train.alpha=0.3"), concept).fingerprint != base
    assert method_stage(sd("fmn.eot_positions=none"), concept).fingerprint == base  # another method's section
    assert method_stage(sd("esd.eta=2.0"), concept).fingerprint == base
    assert method_stage(sd("train.checkpoint_every=7", "train.log_every=3", "device=cpu"), concept).fingerprint == base
    esd = method_stage(sd("method=esd-x"), concept).fingerprint
    assert method_stage(sd("method=esd-x", "esd.eta=2.0"), concept).fingerprint != esd
    assert method_stage(sd("method=esd-x", "mask.ratio=0.3"), concept).fingerprint == esd


def test_ddpm_erase_fingerprint_ignores_evaluation_and_run_only_settings():
    base = load(None, [])
    other = load(None, ["sample.steps=7", "eval.samples_per_class=3", "unlearn.checkpoint_every=9"])
    for method in ("salun", "esd"):
        assert erase_stage(base, method).fingerprint == erase_stage(other, method).fingerprint
    assert erase_stage(base, "salun").fingerprint != erase_stage(load(None, ["unlearn.alpha=0.5"]), "salun").fingerprint


def test_a_new_field_joins_the_fingerprint_without_being_listed():
    config = Config()
    fp = config_fingerprint(config, ("unlearn",))
    config.unlearn.mask.batch_size += 1
    assert config_fingerprint(config, ("unlearn",)) != fp


def test_run_reuses_and_refuses(tmp_path):
    config = Config()
    calls = []
    stage = Stage(tmp_path / "s", "fp1")
    assert stage.run(config, lambda: calls.append(1) or {"n": 1}) is True
    assert Stage(tmp_path / "s", "fp1").run(config, lambda: calls.append(2) or {}) is False
    assert calls == [1]
    with pytest.raises(ErasureError, match="different settings"):
        Stage(tmp_path / "s", "fp2").done()


def test_a_run_from_an_older_fingerprint_scheme_says_so(tmp_path):
    (tmp_path / "done.json").write_text(json.dumps({"fingerprint": "0123456789abcdef"}))
    with pytest.raises(ErasureError, match="older version of erasure"):
        Stage(tmp_path, "fedcba9876543210").done()


def test_classification_fingerprints_cover_a_methods_own_settings_only():
    from erasure.classification.config import ClassificationConfig
    from erasure.classification.pipeline import method_stage, original_stage

    def cls(*overrides: str) -> ClassificationConfig:
        return load_config(None, list(overrides), schema=ClassificationConfig)

    base = method_stage(cls(), "salun").fingerprint
    assert method_stage(cls("unlearn.salun.lr=0.02"), "salun").fingerprint != base
    assert method_stage(cls("unlearn.rl.lr=0.02"), "salun").fingerprint == base  # another method's section
    assert method_stage(cls("unlearn.checkpoint_every=3"), "salun").fingerprint == base  # run-only
    assert method_stage(cls("unlearn.batch_size=64"), "salun").fingerprint != base  # shared by every method
    assert original_stage(cls("forget.fraction=0.5")).fingerprint == original_stage(cls()).fingerprint


def test_the_training_precision_is_part_of_every_training_stage_fingerprint():
    """A bf16 model is another model than an fp32 one; "auto" on a CPU is the same run as "no"."""
    from erasure.classification.config import ClassificationConfig
    from erasure.classification.pipeline import method_stage as classification_stage
    from erasure.classification.pipeline import original_stage
    from erasure.ddpm.pipeline import base_stage

    def fingerprints(precision: str) -> list[str]:
        ddpm = load(None, ["device=cpu", f"mixed_precision={precision}"])
        cls = load_config(None, ["device=cpu", f"mixed_precision={precision}"], schema=ClassificationConfig)
        stages = [base_stage(ddpm), erase_stage(ddpm, "salun"), original_stage(cls), classification_stage(cls, "retrain")]
        return [*(s.fingerprint for s in stages), classification_stage(cls, "rl").fingerprint]

    no, auto, bf16 = fingerprints("no"), fingerprints("auto"), fingerprints("bf16")
    assert no == auto  # a CPU resolves auto to fp32
    assert all(a != b for a, b in zip(no, bf16))
