# Two commands do all the setup on a fresh clone:
#   make demo   - create .venv, install erasure, run the offline demo (CPU, a few minutes)
#   make test   - create .venv, install erasure with its test extra, run ruff and the tests (all of them: what CI runs)
#   make test-fast - the same without the tests marked slow (multi-process, Inception, notebooks, end-to-end runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-fast install lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	# torch/torchvision first, pinned to a pair whose wheels work together (see README: Install)
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/erasure demo

test: install
	$(BIN)/ruff check erasure tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/ruff check erasure tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
