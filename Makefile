# Two commands do all the setup on a fresh clone:
#   make demo   - create .venv, install erasure, run the offline demo (CPU, a few minutes)
#   make test   - create .venv, install erasure with its test extra, run ruff and the tests (all of them: what CI runs)
#   make test-fast - the same without the tests marked slow (multi-process, Inception, notebooks, end-to-end runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test test-fast install lint clean gpu-check gpu-tables

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
	@echo
	@echo "Next: . $(VENV)/bin/activate, then for example"
	@echo "  erasure erase --method rl --method esd     # baselines on the same base model"
	@echo "  erasure evaluate --method salun --method rl --method esd"
	@echo "  erasure unlearn-classifier                 # the classification table (minutes)"
	@echo "  erasure --help"

test: install
	$(BIN)/ruff check erasure tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/ruff check erasure tests benchmarks
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# On a GPU machine, with the image's own Python (no venv, no network): tests on CUDA, the demo,
# bf16 and SD erases, an audit, the classification table and the SD speed benchmarks; one JSON.
# .whl/ and .gpu-data/ come from benchmarks/gpu_wheels.sh when the image lacks diffusers & co.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(wildcard .whl/*.whl),--wheels .whl) \
		$(if $(wildcard .gpu-data/clip_tokenizer),--tokenizer .gpu-data/clip_tokenizer) \
		$(if $(wildcard .gpu-data/cifar10/cifar10_full_jpeg_q75.npz),--cifar10 .gpu-data/cifar10/cifar10_full_jpeg_q75.npz)

# The three CIFAR-10 tables (fast recipe, every method, sweeps of SalUn's and RL's lr; random 10% also SalUn's
# mask mode) on one GPU, ~16 min on an H100 (estimated); PART=random10 or PART=others runs half. Needs .gpu-data/cifar10/.
gpu-tables:
	PYTHON=$(PYTHON) sh benchmarks/gpu_tables.sh $${PART:-all}

clean:
	rm -rf $(VENV) runs
