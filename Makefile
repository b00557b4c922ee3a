# Every target builds its own virtual environment (.venv) with a CPU build of torch.
# TORCH_PIN is pinned here (this machine ships that CPU wheel); the package itself only needs torch>=2.2.
PYTHON ?= python3
VENV   ?= .venv
TORCH_PIN ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean fuzz

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)" -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lipbound demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

test: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 -q src tests

bench: $(STAMP)
	$(BIN)/pip install -q "$(TORCH_PIN)" -e ".[bench]"
	$(BIN)/python benchmarks/spectral.py
	$(BIN)/python benchmarks/autolip.py
	$(BIN)/python benchmarks/seqlip.py
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/regularise.py

fuzz: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/fuzz.py --graphs 10000 --out benchmarks/results/fuzz.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
