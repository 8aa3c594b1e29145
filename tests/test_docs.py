"""The documentation site builds with `mkdocs build --strict`: every link resolves, on the site as in the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[test]' (or '.[docs]') to build the site")
pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[test]' (or '.[docs]')")

ROOT = Path(__file__).resolve().parents[1]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"), "--site-dir", str(site)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_site_builds_strictly_with_readme_as_front_page_and_linked_repository_files(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "Quick start" in index  # README.md is the front page
    assert 'href="ddpm/"' in index  # README's docs/ddpm.md link points at the page on the site
    # a page's ../benchmarks/results/*.png link is served, and the image is there
    page = (tmp_path / "site" / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert 'src="../repo/benchmarks/results/ddpm_erasure_mnist16_cpu-16px_grid.png"' in page
    assert (tmp_path / "site" / "repo" / "benchmarks" / "results" / "ddpm_erasure_mnist16_cpu-16px_grid.png").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The hook serves files that exist; it must not hide a link to one that does not."""
    root = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", root / "docs")
    shutil.copy(ROOT / "mkdocs.yml", root)
    shutil.copy(ROOT / "README.md", root)
    shutil.copytree(ROOT / "benchmarks" / "results", root / "benchmarks" / "results")
    shutil.copytree(ROOT / "prompts", root / "prompts")
    page = root / "docs" / "benchmarks.md"
    page.write_text(page.read_text(encoding="utf-8") + "\n![gone](../benchmarks/results/no-such-grid.png)\n", encoding="utf-8")
    result = build(root, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-grid.png" in result.stdout + result.stderr
