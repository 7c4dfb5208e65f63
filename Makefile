# Two set-up-and-go targets (see README.md): `make demo` and `make test`; `make bench`, the
# benchmarks; and `make gpu-check`, whether a GPU machine trains (README: GPU machines). All create the virtual environment on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra arguments: `make demo ARGS="train.steps=50"`, `make demo DEMO_DATA_ARGS="--train-samples 500"`,
# `make test PYTEST_ARGS="-m 'not slow'"`, `make bench BENCH_ARGS="--only throughput fill"`.
ARGS ?=
DEMO_DATA_ARGS ?=
PYTEST_ARGS ?= -x
BENCH_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: demo test bench gpu-check env

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: env
	$(BIN)/mmscale shards demo --out data/demo $(DEMO_DATA_ARGS)
	$(BIN)/mmscale train recipes/demo.yaml $(ARGS)

# install.sh: the Debian packages of the local SLURM cluster for the tests marked `slurm`
# (as root with apt-get; elsewhere it says why and those tests skip).
test: env
	bash slurm/local-cluster/install.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Every benchmark (benchmarks/run.py), one table each, appended with the date, machine,
# versions and commit to benchmarks/RESULTS.md; about 20 minutes on 2 CPU cores.
bench: env
	$(BIN)/python -m benchmarks --results benchmarks/RESULTS.md $(BENCH_ARGS)

# The gpu extra from wheels alone (--only-binary: a package that would compile fails here rather than
# building for half an hour); where torch sees no GPU, pip resolves the same install as a dry run.
# pip's report of it goes to the check, which lists the wheels' tags; then one table, appended to
# RESULTS.md. flash-attn 4 keeps its compiled kernels on disk, so each of the check's processes
# does not compile them again.
gpu-check: env
	if $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then dry=; else dry=--dry-run; fi; \
	$(BIN)/python -m pip install --quiet --only-binary=:all: -c constraints.txt $$dry \
		--report $(VENV)/gpu-extra.json -e '.[gpu]'
	FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 $(BIN)/python -m benchmarks.gpu_check \
		--install-report $(VENV)/gpu-extra.json --results benchmarks/RESULTS.md $(GPU_CHECK_ARGS)
