"""Every notebook executes top to bottom (nbclient), on tiny models and a temporary workdir.

A notebook's cell tagged ``parameters`` holds the settings a reader edits (where to write,
real weights or tiny ones); the test replaces it, as papermill would, so the notebooks
run in seconds and write nothing into the repository.
"""

from pathlib import Path

import pytest

from tests.conftest import TINY

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
TINY_TABLE_OPTS = [
    "model.width=4", "train.epochs=2", "retrain.epochs=2", "unlearn.ft.epochs=1", "unlearn.rl.epochs=1", "unlearn.ga.epochs=1",
    "unlearn.l1.epochs=1", "unlearn.salun.epochs=1", "unlearn.iu.samples=8", "split.train_limit=300", "split.test_limit=100", "device=cpu",
]  # fmt: skip


def parameters(name: str, tmp: Path) -> str:
    if name == "ddpm_demo.ipynb":
        return f"workdir = {str(tmp / 'demo')!r}\noverrides = {[*TINY, 'device=cpu']!r}"
    if name == "sd_erasure.ipynb":
        tiny = ["generation.images_per_set=4", "generation.steps=2", "generation.batch_size=2", "mask.batches=2", "mask.batch_size=2",
                "train.steps=2", "train.batch_size=2", "train.lr=1e-3", "device=cpu"]  # fmt: skip
        return f"base = None\nworkdir = {str(tmp / 'sd')!r}\noverrides = {tiny!r}\nsteps = 2"
    if name == "nudity_audit.ipynb":
        return f"models = None\nprompts = None\ncategory = None\nsteps = 2\nout = {str(tmp / 'audit')!r}"
    if name == "classification.ipynb":
        return f"config_file = None\nworkdir = {str(tmp / 'cls')!r}\noverrides = {TINY_TABLE_OPTS!r}"
    raise AssertionError(f"{name} has no test parameters: add them here")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"commit {name} without outputs"
    tagged[0].source = parameters(name, tmp_path)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
