# `make demo` and `make test` work on a fresh machine with only Python 3.11:
# they create .venv, install mmalign with its test extras, then run.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-extra clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/mmalign demo

# bench: the comparison rows (vs TRL and the reference recipes, at real shapes), <= 15 minutes on
# 2 CPU cores; bench-extra: the cache, scaling and current-family real-shape rows (~4 minutes)
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks --only all --repeats 2
	$(BIN)/python -m benchmarks.text_real --steps 3 --warmup 1 --sides mmalign mmalign_packed trl trl_gc
	$(BIN)/python -m benchmarks.vlm_real --steps 4 --warmup 1
	$(BIN)/python -m benchmarks.pipelines_real --steps 2 --warmup 1 --num-pairs 2
	$(BIN)/python -m benchmarks.pipelines_real --rows sdxl --steps 2 --warmup 1 --num-pairs 2 --out benchmarks/results/pipelines_real_sdxl.json

bench-extra: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.diffusion_cache
	$(BIN)/python -m benchmarks.scaling
	$(BIN)/python -m benchmarks.real_shapes

clean:
	rm -rf $(VENV) runs .pytest_cache
