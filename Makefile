# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing and
# installs the pinned dependencies and the project into it before running.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/scaletrain demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Local iteration: skip the slow multi-process and end-to-end tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not slurm"

lint: $(STAMP)
	$(BIN)/ruff check .
