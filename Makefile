# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# vaediag into it (editable, with the test tools) the first time, and again when pyproject.toml
# changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: help demo test lint bench clean

help:
	@echo "make demo   train the default VAE on the built-in toyfaces data into $(DEMO), analyse it"
	@echo "make test   run the test suite"
	@echo "make lint   run ruff"
	@echo "make bench  run the benchmarks in benchmarks/"
	@echo "make clean  remove .venv and runs/"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vaediag train --out $(DEMO) --overwrite
	$(BIN)/vaediag analyze $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check vaediag tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs
