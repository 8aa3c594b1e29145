"""Nothing unverified is unpickled: a malicious pickle planted in every cache path we read is refused, never run.

Each test plants a pickle whose ``__reduce__`` writes a marker file when it is unpickled
with ``weights_only=False`` (the control test shows the payload is live), points the tool
at it the way a user would, and asserts a clear refusal and no marker.
"""

import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from erasure.cli import main
from erasure.core.errors import ErasureError
from erasure.ddpm.config import FidConfig
from erasure.evaluation.metrics.fid import (
    CACHED_WEIGHTS,
    fid,
    folder_fid,
    hub_cache_file,
    resolve_inception,
)


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def plant(path: Path, marker: Path) -> Path:
    """A torch file that looks like a state dict and runs the payload when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(1), "evil": Payload(marker)}, path)
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache of our own (torch.hub.get_dir() reads TORCH_HOME on each call)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home / "hub" / "checkpoints"


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "PAYLOAD-RAN"
    yield m
    assert not m.exists(), "a planted pickle was executed"


def images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return folder


def test_the_payload_is_live(tmp_path):
    """Control: an unsafe load of the planted file really does run the payload."""
    m = tmp_path / "ran"
    torch.load(plant(tmp_path / "w.pth", m), weights_only=False)
    assert m.read_text() == "payload ran"


def test_planted_inception_in_torch_hub_cache_is_refused(torch_home, marker, tmp_path, capsys):
    planted = plant(torch_home / CACHED_WEIGHTS, marker)
    assert hub_cache_file() == planted
    a = images(tmp_path / "a")
    for protocol in ("standard", "salun"):
        assert main(["fid", "--generated", str(a), "--reference", str(a), "--protocol", protocol]) == 2
        err = capsys.readouterr().err
        assert "do not match torch-fidelity's published SHA-256" in err and "Delete that file" in err and "Traceback" not in err
    # The DDPM evaluation's FID path reads the same cache, for auto and inception features.
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    for features in ("auto", "inception"):
        with pytest.raises(ErasureError, match="published SHA-256"):
            fid(x, x, FidConfig(features=features))


def test_a_wrong_but_harmless_cached_file_is_refused_too(torch_home):
    torch_home.mkdir(parents=True)
    torch.save({"w": torch.zeros(3)}, torch_home / CACHED_WEIGHTS)
    with pytest.raises(ErasureError, match="published SHA-256"):
        resolve_inception(None)


def test_planted_inception_given_by_path_is_refused(torch_home, marker, tmp_path, capsys):
    planted = plant(tmp_path / "given.pth", marker)
    a = images(tmp_path / "a")
    for protocol in ("standard", "salun"):
        assert main(["fid", "--generated", str(a), "--reference", str(a), "--protocol", protocol, "--weights", str(planted)]) == 2
        assert "refusing to load" in capsys.readouterr().err
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ErasureError, match="refusing to load"):
        fid(x, x, FidConfig(features="inception", weights=str(planted)))


def test_an_unlisted_plain_state_dict_given_by_path_is_accepted_and_named(tmp_path):
    """A copy the user converted (not in the known list) works when given explicitly: opened with weights_only=True."""
    path = tmp_path / "converted.pth"
    torch.save({"w": torch.arange(3.0)}, path)
    checked = resolve_inception(path)
    assert checked.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "unlisted" in checked.check and checked.sha256 in checked.describe()
    assert torch.equal(torch.load(checked.stream(), weights_only=True)["w"], torch.arange(3.0))


def test_torch_fidelity_gets_checked_bytes_never_a_path(tmp_path, monkeypatch):
    """torch-fidelity unpickles with weights_only=False, so it must not get a path it could re-read after our check."""
    import torch_fidelity.registry as registry

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__()
            seen.append(feature_extractor_weights_path)
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return (x.double().flatten(1)[:, :4],)

    monkeypatch.setitem(registry.FEATURE_EXTRACTORS_REGISTRY, "inception-v3-compat", Recorder)
    path = tmp_path / "converted.pth"
    torch.save({"w": torch.zeros(1)}, path)
    a, b = images(tmp_path / "a", 4), images(tmp_path / "b", 4)
    r = folder_fid(a, b, "standard", weights=str(path), kid_subsets=2)
    assert len(seen) == 1 and not isinstance(seen[0], (str, Path))
    assert r["weights"].startswith(str(path)) and "weights_only=True" in r["weights"]


def test_planted_resnet50_in_torch_hub_cache_is_refused(torch_home, marker, tmp_path, capsys):
    from torchvision.models import ResNet50_Weights

    from erasure.evaluation.audit import load_classifier

    plant(torch_home / ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[1], marker)
    with pytest.raises(ErasureError, match="hash prefix 11ad3fa6"):
        load_classifier()
    csv = tmp_path / "imagenette.csv"
    csv.write_text("case_number,prompt,evaluation_seed,class\n0,an image of a tench,5,tench\n")
    args = ["audit", "ua", "--prompts", str(csv), "--model", f"m={tmp_path / 'unused'}", "--forget-class", "tench"]
    assert main([*args, "--out", str(tmp_path / "ua")]) == 2
    assert "refusing to load" in capsys.readouterr().err


def test_planted_resnet50_given_by_path_is_refused(marker, tmp_path):
    from erasure.evaluation.audit import load_classifier

    with pytest.raises(ErasureError, match="refusing to load"):
        load_classifier(str(plant(tmp_path / "resnet50.pth", marker)))


def test_nudenet_loads_only_its_wheels_onnx(marker, tmp_path, monkeypatch):
    from erasure.evaluation.metrics import nudity

    real_path, expected = nudity.installed_detector()
    assert real_path.name == "320n.onnx" and real_path.parent.name == "nudenet"
    data = nudity.detector_model()
    assert hashlib.sha256(data).hexdigest() == expected and data[:1] == b"\x08"  # an ONNX protobuf, as the wheel shipped it
    # A raw pickle or a torch file in the detector's place is refused, whether or not a hash was forged to match it.
    raw = tmp_path / "raw" / "320n.onnx"
    raw.parent.mkdir()
    raw.write_bytes(pickle.dumps(Payload(marker)))
    for planted, kind in ((raw, "a pickle"), (plant(tmp_path / "zip" / "320n.onnx", marker), "a zip")):
        own_hash = hashlib.sha256(planted.read_bytes()).hexdigest()
        for recorded in (expected, own_hash):
            monkeypatch.setattr(nudity, "installed_detector", lambda p=planted, r=recorded: (p, r))
            with pytest.raises(ErasureError, match=f"is {kind}.*refusing to load"):
                nudity.detector_model()
    # The audit's detection step goes through the same check.
    image = images(tmp_path / "imgs", 1) / "0.png"
    with pytest.raises(ErasureError, match="refusing to load"):
        nudity.detect([image])


# ----------------------------------------------------------------------------- the CLI's error boundary


def test_a_workdir_that_is_a_file_is_one_clear_line(tmp_path, capsys, tiny_overrides):
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    args = ["train-ddpm", *tiny_overrides, f"workdir={workdir}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Not a directory:") and str(workdir / "ddpm") in err
    assert "a part of that path is a file" in err and "Traceback" not in err
    with pytest.raises(NotADirectoryError):  # --debug: the traceback, wherever the flag stands
        main([*args, "--debug"])
    with pytest.raises(NotADirectoryError):
        main(["--debug", *args])


def test_a_read_only_folder_is_one_clear_line(tmp_path, capsys, tiny_overrides, monkeypatch):
    import errno
    import os

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the folder refuse writes as a read-only mount would
        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if folder in self.parents:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        folder.chmod(0o555)
    try:
        assert main(["train-classifier", *tiny_overrides, f"workdir={folder / 'run'}"]) == 2
    finally:
        folder.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith("error: Permission denied:") and str(folder / "run") in err and "check the permissions" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_os_errors_of_every_kind_name_path_and_fix():
    import errno

    from erasure.cli import describe_os_error

    full = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/run/model.safetensors"))
    assert "'/data/run/model.safetensors'" in full and "disk is full" in full
    moved = describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"))
    assert "'/a' -> '/b'" in moved and "--debug" in moved
