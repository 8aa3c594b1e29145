"""Classification unlearning: methods, mask constraint, MIA, splits, config errors, CLI (all tiny, CPU)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from erasure.classification.config import ClassificationConfig
from erasure.classification.data import Split, augment, make_split
from erasure.classification.methods import METHODS, UnlearnContext, get_method
from erasure.classification.metrics import make_table, markdown, mia_efficacy
from erasure.classification.model import resnet18
from erasure.classification.train import Pass, PassSchedule
from erasure.cli import main
from erasure.core.config import load_config
from erasure.core.data import EpochSampler
from erasure.core.errors import ErasureError
from erasure.core.loop import LoopSettings, _lr_factor, make_accelerator, shard
from erasure.core.saliency import Mask
from tests.conftest import DEVICE

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_TABLE = [
    f"device={DEVICE}",
    "model.width=4",
    "train.epochs=2",
    "retrain.epochs=2",
    "unlearn.ft.epochs=1",
    "unlearn.rl.epochs=1",
    "unlearn.ga.epochs=1",
    "unlearn.l1.epochs=1",
    "unlearn.salun.epochs=1",
    "unlearn.iu.samples=8",
    "split.train_limit=300",
    "split.test_limit=100",
]


def tiny_context(folder, **overrides) -> tuple[UnlearnContext, torch.nn.Module]:
    """Random 3x8x8 images of 4 classes, a width-4 ResNet-18, one epoch per method."""
    opts = [*TINY_TABLE, "unlearn.batch_size=16", "unlearn.augment=true", *[f"{k}={v}" for k, v in overrides.items()]]
    config = load_config(None, opts, schema=ClassificationConfig)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (80, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (80,), generator=g)
    forget, retain = (images[:16], labels[:16]), (images[16:], labels[16:])
    ctx = UnlearnContext(config, make_accelerator(DEVICE), folder, "test", *forget, *retain, num_classes=4)
    torch.manual_seed(0)
    return ctx, resnet18(4, 3, width=4)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_and_changes_the_model(tmp_path, name):
    ctx, model = tiny_context(tmp_path)
    before = copy.deepcopy(model.state_dict())
    out = get_method(name)(ctx).run(model)
    after = {k: v.cpu() for k, v in out.state_dict().items()}  # trained on DEVICE
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_salun_leaves_masked_out_weights_bit_identical(tmp_path):
    ctx, model = tiny_context(tmp_path, **{"unlearn.salun.epochs": 2, "unlearn.weight_decay": 0.1})
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = get_method("salun")(ctx)
    out = method.run(model)
    mask = Mask.load(tmp_path / "mask.safetensors", out)
    assert mask.info["loss"] == "classifier-neg-ce"
    assert method.info["mask_kept_fraction"] == pytest.approx(0.5, abs=1e-4)
    changed = 0
    for n, p in out.named_parameters():
        keep, p = mask.tensors[n], p.detach().cpu()
        assert torch.equal(p[~keep], original[n][~keep]), n  # momentum and weight decay included
        changed += int((p[keep] != original[n][keep]).sum())
    assert changed > 0


def test_mia_efficacy_on_known_cases():
    g = torch.Generator().manual_seed(0)
    members = 0.9 + 0.1 * torch.rand(400, generator=g)  # confident: seen in training
    non_members = 0.5 * torch.rand(200, generator=g)
    assert mia_efficacy(members, non_members, 0.9 + 0.1 * torch.rand(100, generator=g)) < 2  # forget set looks trained on
    assert mia_efficacy(members, non_members, 0.5 * torch.rand(100, generator=g)) > 98  # forget set looks unseen


def test_gap_table():
    rows = {"retrain": {"UA": 5.0, "RA": 100.0, "TA": 94.0, "MIA": 13.0}, "x": {"UA": 3.0, "RA": 99.0, "TA": 93.0, "MIA": 17.0, "RTE": 0.5}}
    table = make_table(rows)
    assert table[0]["avg_gap"] == 0
    assert table[1]["gap_MIA"] == 4 and table[1]["avg_gap"] == pytest.approx((2 + 1 + 1 + 4) / 4)
    assert "| x | 3.00 (2.00) | 99.00 (1.00) | 93.00 (1.00) | 17.00 (4.00) | 2.00 | 0.50 |" in markdown(table)


def test_split_is_deterministic_disjoint_and_saved(tmp_path):
    config = load_config(None, ["split.val_size=50", "split.test_limit=60", "forget.fraction=0.25"], schema=ClassificationConfig)
    train_labels, test_labels = torch.arange(400) % 10, torch.arange(100) % 10
    a = make_split(train_labels, test_labels, config.split, config.forget)
    b = make_split(train_labels, test_labels, config.split, config.forget)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("train", "val", "forget", "retain", "test"))
    assert (len(a.train), len(a.val), len(a.forget), len(a.test)) == (350, 50, 88, 60)
    assert set(a.train.tolist()).isdisjoint(a.val.tolist())
    assert sorted(a.forget.tolist() + a.retain.tolist()) == a.train.tolist()
    other = load_config(None, ["split.val_size=50", "forget.fraction=0.25", "forget.seed=1"], schema=ClassificationConfig)
    assert not torch.equal(make_split(train_labels, test_labels, other.split, other.forget).forget, a.forget)

    a.save(tmp_path / "split.safetensors", "fp")
    loaded = Split.load(tmp_path / "split.safetensors", "fp")
    assert torch.equal(loaded.forget, a.forget) and torch.equal(loaded.test, a.test)
    with pytest.raises(ErasureError, match="other settings"):
        Split.load(tmp_path / "split.safetensors", "another")

    cls = load_config(None, ["split.val_size=50", "forget.kind=class", "forget.class_index=3"], schema=ClassificationConfig)
    c = make_split(train_labels, test_labels, cls.split, cls.forget)
    assert (train_labels[c.forget] == 3).all() and not (train_labels[c.retain] == 3).any()
    assert (test_labels[c.test_forget] == 3).all() and len(c.test_forget) == 10
    assert not (test_labels[c.test] == 3).any() and len(c.test) == 90


def test_sampler_covers_each_image_once_per_epoch():
    sampler = EpochSampler(10, 4, seed=0)
    assert sampler.steps_per_epoch == 3
    for epoch in range(2):
        seen = torch.cat([sampler(epoch * 3 + i) for i in range(3)])
        assert sorted(seen.tolist()) == list(range(10))
    assert not torch.equal(torch.cat([sampler(i) for i in range(3)]), torch.cat([sampler(3 + i) for i in range(3)]))


def test_augment_crops_and_flips_the_padded_image():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    y = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        windows = [padded[i, :, a : a + 8, b : b + 8] for a in range(9) for b in range(9)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(2)) for w in windows)


def test_resnet18_has_the_cifar_stem():
    model = resnet18(10, 3, width=64)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    assert resnet18(10, 1, width=4)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_multistep_lr():
    s = LoopSettings(steps=100, lr=1.0, milestones=(50, 75), gamma=0.1, warmup_steps=10)
    assert [_lr_factor(i, s) for i in (0, 9, 10, 49)] == [0.1, 1.0, 1.0, 1.0]
    assert _lr_factor(50, s) == pytest.approx(0.1) and _lr_factor(99, s) == pytest.approx(0.01)


def test_bad_method_and_unknown_key_are_clear_errors():
    with pytest.raises(ErasureError, match="unknown classification-unlearning method 'sallun'; choose one of: .*salun"):
        load_config(None, ["unlearn.methods=[ft,sallun]"], schema=ClassificationConfig)
    with pytest.raises(ErasureError, match="unknown config key 'unlearn.salun.ratoi'. Did you mean 'ratio'"):
        load_config(None, ["unlearn.salun.ratoi=0.3"], schema=ClassificationConfig)
    with pytest.raises(ErasureError, match="forget.fraction"):
        load_config(None, ["forget.fraction=1.5"], schema=ClassificationConfig)


def test_cli_runs_the_table_and_a_rerun_reuses_every_method(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert main(["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE]) == 0
    first = capsys.readouterr().out
    report = json.loads((workdir / "results.json").read_text())
    assert [row["method"] for row in report["table"]] == ["original", "retrain", "ft", "rl", "ga", "iu", "l1", "salun"]
    assert report["table"][1]["avg_gap"] == 0 and all(row["avg_gap"] is not None for row in report["table"])
    assert (workdir / "split.safetensors").is_file() and (workdir / "salun" / "mask.safetensors").is_file()
    assert "| salun |" in (workdir / "results.md").read_text() and "[salun] unlearning" in first

    stamps = {p: p.stat().st_mtime_ns for p in workdir.glob("*/model.safetensors")}
    assert main(["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE]) == 0
    assert "unlearning ->" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in workdir.glob("*/model.safetensors")} == stamps

    # Changing one method's settings touches only that method, and refuses to overwrite it.
    assert main(["unlearn-classifier", "--workdir", str(workdir), *TINY_TABLE, "unlearn.ft.lr=0.5"]) == 2
    assert "'" + str(workdir / "ft") + "' already holds a finished run" in capsys.readouterr().err


def test_original_from_reuses_one_original_model_across_forgetting_settings(tmp_path, capsys):
    """Random 10% and 50% share one original model, as the reference's --model_path; it is scored on each forget set."""
    first, second = tmp_path / "random10", tmp_path / "random50"
    quick = [*TINY_TABLE, "unlearn.methods=[rl]"]
    assert main(["unlearn-classifier", "--workdir", str(first), *quick]) == 0
    capsys.readouterr()
    assert main(["unlearn-classifier", "--workdir", str(second), *quick, "forget.fraction=0.5", f"original_from={first}"]) == 0
    out = capsys.readouterr().out
    assert "[original] reusing" in out and "[original] training" not in out
    assert (second / "original" / "model.safetensors").read_bytes() == (first / "original" / "model.safetensors").read_bytes()
    done = json.loads((second / "original" / "done.json").read_text())
    assert done["reused_from"] == str(first / "original")
    sizes = json.loads((second / "results.json").read_text())["sizes"]
    assert sizes["forget"] == 150  # scored against this config's forget set (half of the 300 training images)

    # Other training settings would make it another experiment's model: refused, with the fix.
    assert main(["unlearn-classifier", "--workdir", str(tmp_path / "c"), *quick, "train.lr=0.123", f"original_from={first}"]) == 2
    assert "trained with other data, split, model or train settings" in capsys.readouterr().err
    assert main(["unlearn-classifier", "--workdir", str(tmp_path / "d"), *quick, f"original_from={tmp_path / 'none'}"]) == 2
    assert "holds no finished original model" in capsys.readouterr().err


def test_a_diverging_iu_step_is_a_clear_error(tmp_path):
    ctx, model = tiny_context(tmp_path, **{"unlearn.iu.alpha": 1e300})
    with pytest.raises(ErasureError, match="IU step is not finite"):
        get_method("iu")(ctx).run(model)


def test_shards_split_every_global_batch_once():
    for n, processes in [(30, 2), (31, 2), (18, 4), (5, 5)]:
        parts = [shard(n, rank, processes) for rank in range(processes)]
        assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]] and parts[0].start == 0 and parts[-1].stop == n
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_a_batch_smaller_than_the_process_count_is_a_clear_error():
    forget = Pass(torch.zeros(33, 3, 8, 8, dtype=torch.uint8), torch.zeros(33, dtype=torch.long), name="forget")
    schedule = PassSchedule([forget], batch_size=16, seed=0)  # 16, 16, 1
    schedule.check_shardable(1, "salun")
    with pytest.raises(ErasureError, match="forget pass ends each epoch with a batch of 1 image.*drop_last=true"):
        schedule.check_shardable(2, "salun")
    PassSchedule([forget], batch_size=16, seed=0, drop_last=True).check_shardable(2, "salun")


@pytest.mark.slow
def test_gpu_tables_script_runs_the_three_settings_on_a_tiny_dataset(tmp_path):
    """benchmarks/gpu_tables.sh is run on a GPU with little device time to spare; a bug in it must show here first."""
    import os
    import subprocess
    import sys

    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny_cifar10.npz"
    np.savez(
        data,
        x_train=rng.integers(0, 256, (320, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(320) % 10,
        x_test=rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(60) % 10,
    )
    out, runs = tmp_path / "results", tmp_path / "runs"
    tiny = ["split.val_size=20", "model.width=4", "train.epochs=1", "retrain.epochs=1", "train.warmup_epochs=0", "retrain.warmup_epochs=0"]
    tiny += ["train.batch_size=64", "retrain.batch_size=64", "unlearn.batch_size=32", "unlearn.iu.samples=4", "eval_batch_size=64"]
    tiny += [f"unlearn.{m}.epochs=1" for m in ("ft", "rl", "ga", "l1", "salun")] + [f"device={DEVICE}"]
    env = {**os.environ, "PYTHON": sys.executable, "CIFAR10": str(data), "OUT": str(out), "RUNS": str(runs), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["sh", "benchmarks/gpu_tables.sh", "all", "tiny", *tiny], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    made = sorted(p.name for p in out.iterdir())
    settings, suffixes = ("random10", "random50", "class"), (".json", ".md", "_sweep.md")
    expected = [f"classification_cifar10_{s}_fast_tiny{x}" for s in settings for x in suffixes]
    assert made == sorted(expected)
    random10 = json.loads((out / "classification_cifar10_random10_fast_tiny.json").read_text())
    assert [row["method"] for row in random10["table"]] == ["original", "retrain", "ft", "rl", "ga", "iu", "l1", "salun"]
    # original, Retrain, SalUn at three lrs x two mask modes, RL at two lrs: 10 rows from 12 grid points
    assert len(random10["sweep"]["table"]) == 2 + 6 + 2
    assert (random10["sweep"]["points_done"], random10["sweep"]["points"]) == (12, 12)
    rows = {(row.get("base_method"), row.get("point")): row for row in random10["sweep"]["table"]}
    for method, point in (("salun", "salun.lr=0.013,salun.mask_mode=hard"), ("rl", "rl.lr=0.01")):  # the configs' own settings
        assert random10["stages"][method]["metrics"] == {k: rows[method, point][k] for k in ("UA", "RA", "TA", "MIA")}
    for setting, sizes in (("random50", {"forget": 150, "test_forget": 0}), ("class", {"test_forget": 6, "test": 54})):
        report = json.loads((out / f"classification_cifar10_{setting}_fast_tiny.json").read_text())
        assert sizes.items() <= report["sizes"].items()
        assert len(report["sweep"]["table"]) == 2 + 3 + 2  # SalUn at three lrs, RL at two; the table itself is kept
        assert [row["method"] for row in report["table"]] == ["original", "retrain", "ft", "rl", "ga", "iu", "l1", "salun"]
        assert report["stages"]["original"]["reused_from"] == str(runs / "cifar10_random10_fast" / "original")

    no_drops = ["train.milestones=[]", "retrain.milestones=[]"]  # the reference's lr drops at epochs 91, 136: none in 1 epoch
    recipe_run = ["sh", "benchmarks/gpu_tables.sh", "recipe", "tiny", *tiny, *no_drops]
    result = subprocess.run(recipe_run, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for recipe, lr in (("reference", 0.1), ("fast-b256", 0.2)):
        name = "cifar10_random10" if recipe == "reference" else "cifar10_random10_fast"
        report = json.loads((out / f"classification_{name}_tiny-original-{recipe}.json").read_text())
        assert [row["method"] for row in report["table"]] == ["original"] and report["settings"]["train"]["lr"] == lr
        assert report["settings"]["workdir"] == str(runs / f"recipe-{recipe}")

    # trials: the random-10% table (Retrain, RL, SalUn) three times; trial 0 is the table made above
    result = subprocess.run(["sh", "benchmarks/gpu_tables.sh", "trials", "tiny-trials", *tiny], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "classification_cifar10_random10_fast_tiny-trials.json").read_text())
    assert (report["trials"]["trials_done"], list(report["trials"]["summary"])) == (3, ["original", "retrain", "rl", "salun"])
    assert report["reused"]["salun"] and (out / "classification_cifar10_random10_fast_tiny-trials_trials.md").is_file()


def test_the_classification_path_needs_no_diffusers(tmp_path):
    """A GPU image without diffusers (the device's) runs the classification table: diffusers is imported only where
    an EMA or a diffusion model is used."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('diffusers', 'torch_fidelity', 'nudenet'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from erasure.classification import cli, pipeline\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import common  # the benchmarks' machine() record, used by classification_jpeg.py --label\n"
        "from erasure.core.loop import LoopSettings, make_accelerator, train\n"
        "step = lambda model, g, s: (model(torch.ones(4, 2)).pow(2).mean(), {})\n"
        "train(torch.nn.Linear(2, 1), step, LoopSettings(steps=2, lr=0.1), sys.argv[1], make_accelerator('cpu'))\n"
    )
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def tiny_cifar10(folder: Path) -> Path:
    """A tiny stand-in for .gpu-data/cifar10: random JPEG-packed images and an exact-pixel copy of half the test ones."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = folder / "cifar10"
    data.mkdir()
    packed = {}
    for split, n in (("train", 200), ("test", 40)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        files = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "JPEG", quality=75)
            files.append(np.frombuffer(buffer.getvalue(), np.uint8))
        packed |= {f"{split}_jpeg": np.concatenate(files), f"{split}_offsets": np.cumsum([0, *map(len, files)])}
        packed[f"{split}_labels"] = np.arange(n) % 10
        if split == "test":  # the exact-pixel copy of some test images, as cifar10_exact_subset.npz holds them
            keep = np.arange(0, n, 2)
            exact = {"images": images[keep], "labels": (np.arange(n) % 10)[keep], "split": np.array(["test"] * len(keep))}
            exact |= {"index_in_split": keep, "source_batch": np.zeros(len(keep), np.int64)}
    np.savez(data / "cifar10_full_jpeg_q75.npz", **packed, class_names=np.array([str(i) for i in range(10)]))
    np.savez(data / "cifar10_exact_subset.npz", **exact, class_names=np.array([str(i) for i in range(10)]))
    return data


# The recipe table, tiny: one epoch of a 4-wide network.
TINY_RECIPE = ["split.val_size=20", "model.width=4", "train.epochs=1", "train.warmup_epochs=0", "train.milestones=[]"]
TINY_RECIPE += ["train.batch_size=64", "eval_batch_size=64", f"device={DEVICE}"]


def test_gpu_session_trains_a_table_in_the_background_and_packs_it_after_the_check_beside_it(tmp_path):
    """benchmarks/gpu_session.sh's pair of device calls, run tiny on the CPU: `background` returns at once
    with the table training on from copies of the code and data (the next device call sends the working
    tree again); `beside` runs gpu_check.py, then waits for the table and packs what it wrote into
    $OUT/table.tgz: the recipe table scores each original model on exact and JPEG test images."""
    import os
    import subprocess
    import sys
    import tarfile
    import time

    data = tiny_cifar10(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(data), "OUT": str(out), "WORK": str(work), "OMP_NUM_THREADS": "1"}
    began = time.time()
    command = ["sh", "benchmarks/gpu_session.sh", "background", "recipe", "tiny", *TINY_RECIPE]
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0 and "in the background" in started.stdout, started.stderr
    assert time.time() - began < 20 and not (work / "exit").exists()  # the table still trains
    check = subprocess.run(["sh", "benchmarks/gpu_session.sh", "beside", "1"], env={**env, "WAIT": "300"}, capture_output=True, text=True)
    assert check.returncode == 0 and "background table finished" in check.stdout, check.stdout[-2000:] + check.stderr[-2000:]
    assert (work / "exit").read_text().strip() == "0" and "table exit 0" in (work / "session.log").read_text()
    assert json.loads((out / "gpu_check.json").read_text())["parts"]["demo"]["status"] == "skipped"  # --budget 1
    with tarfile.open(out / "table.tgz") as packed:
        assert {"out/table.log", "session.log"} <= set(packed.getnames())
        for run in ("reference", "fast-b256"):
            scored = json.load(packed.extractfile(f"out/classification_jpeg_tiny-{run}-score.json"))["scored"]
            assert scored["images"] == 20 and 0 <= scored["test_exact"] <= 100 and 0 <= scored["test_jpeg"] <= 100
            assert scored["model"] == f"runs/classification/recipe-{run}/original/model.safetensors"
            assert (work / "repo" / scored["model"]).is_file()


def running(text: str) -> list[int]:
    """The processes whose command line holds ``text`` (Linux's /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return pids


def test_gpu_session_speed_stops_a_background_table_before_timing(tmp_path):
    """A table still training from `background` would share the GPU with `speed`'s timings: it is stopped first."""
    import os
    import subprocess
    import sys
    import time

    data = tiny_cifar10(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(data), "OUT": str(out), "WORK": str(work), "OMP_NUM_THREADS": "1"}
    long = [*TINY_RECIPE, "train.epochs=500"]
    subprocess.run(["sh", "benchmarks/gpu_session.sh", "background", "recipe", "tiny", *long], env=env, check=True, timeout=60)
    assert running(f"{work}/")  # training
    timed = subprocess.run(["sh", "benchmarks/gpu_session.sh", "speed"], env={**env, "PYTHON": "true"}, capture_output=True, text=True)
    assert timed.returncode == 0 and "stopped the background table" in timed.stdout, timed.stdout + timed.stderr
    time.sleep(1)
    assert not running(f"{work}/")  # nothing of it left
