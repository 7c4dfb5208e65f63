# Two set-up-and-go targets (see README.md): `make demo` and `make test`; and `make bench`, the
# benchmarks. All create the virtual environment on first use and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra arguments: `make demo ARGS="train.steps=50"`, `make demo DEMO_DATA_ARGS="--train-samples 500"`,
# `make test PYTEST_ARGS="-m 'not slow'"`, `make bench BENCH_ARGS="--only throughput fill"`.
ARGS ?=
DEMO_DATA_ARGS ?=
PYTEST_ARGS ?= -x
BENCH_ARGS ?=

.PHONY: demo test bench env

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
