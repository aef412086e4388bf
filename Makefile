# Two commands: `make run` (the default workflow) and `make test` (the whole test suite).
# Both create .venv and install the project into it (`pip install -e .`) the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV)/bin)
CORES ?= all
SNAKEMAKE_ARGS ?=
# the rules' scripts run with the environment's python: it comes first
export PATH := $(BIN):$(PATH)

.PHONY: run test test-fast rehearsal install lint format clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

test: $(VENV)/.installed
	python -m pytest tests

test-fast: $(VENV)/.installed
	python -m pytest tests -m "not workflow"

# the dress rehearsals of the study and full configs, each to its last figure on offline
# stand-ins (docs/rehearsal.md; the census's is part of `make test`)
rehearsal: $(VENV)/.installed
	python -m pytest tests/test_rehearsal.py -m rehearsal -s

lint: $(VENV)/.installed
	ruff check .
	ruff format --check .
	snakefmt --check Snakefile rules
	snakemake --lint

format: $(VENV)/.installed
	ruff check --fix .
	ruff format .
	snakefmt Snakefile rules

clean:
	rm -rf results .snakemake
