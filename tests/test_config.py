import re

import pytest

from erasure.cli import main
from erasure.core.config import load_config, parse_override, to_yaml
from erasure.core.errors import ErasureError
from erasure.ddpm.config import Config, load


def test_defaults_are_the_demo():
    config = load()
    assert isinstance(config, Config)
    assert config.data.name == "digits" and config.unlearn.method == "salun"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("unlearn:\n  alpha: 0.5\n  mask:\n    ratio: 0.3\nworkdir: here\n")
    config = load(path, ["unlearn.alpha=2", "model.channels=[16,32]", "unlearn.lr=1e-4"])
    assert config.unlearn.lr == 1e-4  # YAML reads 1e-4 as a string; the schema knows it is a float
    assert config.unlearn.alpha == 2.0 and isinstance(config.unlearn.alpha, float)
    assert config.unlearn.mask.ratio == 0.3
    assert config.model.channels == [16, 32]
    assert config.workdir == "here"


def test_a_section_given_in_part_keeps_its_fields_defaults(tmp_path):
    """GA's section defaults to 5 epochs, its class to 10: a YAML or override naming only its lr keeps the 5."""
    from erasure.classification.config import ClassificationConfig

    path = tmp_path / "c.yaml"
    path.write_text("unlearn:\n  ga:\n    lr: 5.0e-4\n")
    for config in (load_config(path, schema=ClassificationConfig), load_config(None, ["unlearn.ga.lr=5e-4"], schema=ClassificationConfig)):
        assert (config.unlearn.ga.epochs, config.unlearn.ga.lr) == (5, 5e-4)
    assert load_config(None, ["unlearn.ga.epochs=2"], schema=ClassificationConfig).unlearn.ga.epochs == 2


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ErasureError, match=r"unknown config key 'unlearn.alhpa'.*'alpha'"):
        load(None, ["unlearn.alhpa=0.5"])
    path = tmp_path / "c.yaml"
    path.write_text("unlearn:\n  mask:\n    ration: 0.3\n")
    with pytest.raises(ErasureError, match=r"'unlearn.mask.ration'.*'ratio'"):
        load(path)


def test_type_errors():
    with pytest.raises(ErasureError, match="unlearn.steps.*must be int"):
        load(None, ["unlearn.steps=many"])
    with pytest.raises(ErasureError, match="data.name.*choose one of"):
        load(None, ["data.name=imagenet"])
    with pytest.raises(ErasureError, match="must be true or false"):
        load(None, ["unlearn.mask.per_layer=3"])
    with pytest.raises(ErasureError, match="is a section"):
        load(None, ["unlearn=3"])
    with pytest.raises(ErasureError, match="mask.ratio"):
        load(None, ["unlearn.mask.ratio=1.5"])


def test_bad_files(tmp_path):
    with pytest.raises(ErasureError, match="does not exist"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("unlearn: [1, 2\n")
    with pytest.raises(ErasureError, match="not valid YAML"):
        load(bad)
    with pytest.raises(ErasureError, match="key=value"):
        parse_override("unlearn.alpha")


def test_a_config_states_only_what_it_changes_from_its_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("unlearn:\n  alpha: 0.5\n  lr: 1e-4\nworkdir: parent\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\nunlearn:\n  alpha: 2\nworkdir: child\n")
    config = load(tmp_path / "sub" / "child.yaml", ["unlearn.steps=7"])
    assert (config.unlearn.alpha, config.unlearn.lr, config.unlearn.steps, config.workdir) == (2.0, 1e-4, 7, "child")
    (tmp_path / "parent.yaml").write_text("base: sub/child.yaml\n")
    with pytest.raises(ErasureError, match="'base' chain comes back"):
        load(tmp_path / "sub" / "child.yaml")
    (tmp_path / "parent.yaml").write_text("base: [1]\n")
    with pytest.raises(ErasureError, match="'base' must name another config file"):
        load(tmp_path / "sub" / "child.yaml")
    (tmp_path / "parent.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ErasureError, match="gone.yaml' does not exist"):
        load(tmp_path / "sub" / "child.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load(None, ["unlearn.alpha=0.25", "data.path=/x.npz"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(config))
    assert load(saved) == config
    assert config != load()


def test_cli_reports_config_errors(capsys):
    assert main(["config", "unlearn.alhpa=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'unlearn.alhpa'" in err and "alpha" in err and "Traceback" not in err


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        load(path)


def test_yaml_boolean_words_mean_the_choice_they_name():
    """YAML reads `no` and `off` as False; `mixed_precision=no` must still mean 'no'."""
    from erasure.core.config import load_config
    from erasure.sd.config import SDConfig

    assert load(None, ["mixed_precision=no"]).mixed_precision == "no"
    config = load_config("configs/sd/nudity_salun.yaml", ["train.gradient_checkpointing=off"], schema=SDConfig)
    assert config.train.gradient_checkpointing == "off"
    with pytest.raises(ErasureError, match="choose one of"):
        load(None, ["mixed_precision=yes"])


def test_a_config_typo_is_rejected_before_torch_is_imported():
    """Config validation comes before heavy imports, so a typo costs well under a second, not 10-15 s."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from erasure.cli import main\n"
        "for argv in (['erase', 'unlearn.alhpa=0.5'], ['sd', 'erase', 'trian.lr=1'], ['unlearn-classifier', 'unlearn.salun.ratoi=0.3']):\n"
        "    assert main(argv) == 2, argv\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unknown config key 'unlearn.alhpa'" in result.stderr


def test_a_gpu_recipe_started_on_the_cpu_warns(capsys):
    """A GPU-sized config on a CPU says so at once instead of running silently for days."""
    import torch

    from erasure.cli import main

    assert main(["sd", "config", "-c", "configs/sd/nudity_salun.yaml", "device=cpu"]) == 0
    assert "is a GPU recipe and this run is on the CPU" in capsys.readouterr().err
    assert main(["config"]) == 0  # the demo is CPU-sized: no warning
    assert "GPU recipe" not in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["unlearn-classifier", "-c", "configs/classification/cifar10_random10.yaml", "--print-config"]) == 0
        assert "GPU recipe" in capsys.readouterr().err


def test_every_ddpm_config_key_is_documented():
    """docs/ddpm.md's key table lists every key of the schema, so the manual cannot drift from the code."""
    import dataclasses
    from pathlib import Path

    table = Path(__file__).parent.parent.joinpath("docs", "ddpm.md").read_text()

    def keys(section, prefix=""):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            yield from keys(value, prefix + f.name + ".") if dataclasses.is_dataclass(value) else [(prefix, f.name)]

    missing = [p + k for p, k in keys(Config()) if f"`{k}`" not in table]
    assert not missing, f"undocumented in docs/ddpm.md: {missing}"


def test_a_missing_relative_config_names_the_folder_it_was_read_from(tmp_path, monkeypatch):
    """The shipped SD configs name their concept specs from the repository root.

    Run from elsewhere, the error says where it looked and what to do."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ErasureError, match=f"does not exist in the current folder \\({tmp_path}\\); run from the repository root"):
        load_config("configs/sd/concepts/nudity.yaml", schema=Config)
    with pytest.raises(ErasureError, match="missing.yaml' does not exist.$"):
        load_config(tmp_path / "missing.yaml", schema=Config)  # an absolute path needs no hint


@pytest.mark.parametrize("command", [["erase"], ["sd", "erase"]])
def test_erase_help_names_every_method(command, capsys):
    """The help is written by hand (the parser imports no torch); it must keep up with the registry."""
    from erasure.ddpm.methods import METHODS
    from erasure.sd.methods import SD_METHODS

    registry = METHODS if command == ["erase"] else SD_METHODS
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    words = set(re.findall(r"[\w-]+", capsys.readouterr().out))
    assert set(registry) <= words, sorted(set(registry) - words)
