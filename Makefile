# The two commands of the README: `make demo` and `make test`. Each creates .venv and installs
# vaediag into it (editable, with the test tools) the first time, and again when pyproject.toml
# changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
FIXED  := runs/demo-free-bits

.PHONY: help demo test lint bench reports clean

help:
	@echo "make demo   the case study on the built-in data: a run whose loss stops tracking the"
	@echo "            pictures, its diagnosis, its remedy trained beside it, both compared"
	@echo "make test   run the test suite"
	@echo "make lint   run ruff (style, complexity <= 12) and mypy (types)"
	@echo "make bench  run the benchmarks in benchmarks/"
	@echo "make reports  regenerate the example reports in reports/ (case-study presets, reference run)"
	@echo "make clean  remove .venv and runs/"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# The product's story on the built-in data: the case study's run, whose loss keeps improving
# while the faces lose their pose (a KL weight warmed up to 16); its diagnosis; the remedy
# vaediag names (free bits) trained beside it; both in one comparison report.
demo: $(STAMP)
	@echo "== 1/4 training the case study's run: a KL weight warmed up to 16 (about a minute)"
	$(BIN)/vaediag train --preset seed-decoupling --out $(DEMO) --overwrite
	@echo "== 2/4 its diagnosis"
	$(BIN)/vaediag analyze $(DEMO)
	@echo "== 3/4 the remedy it names, free bits, trained beside it (about a minute)"
	$(BIN)/vaediag train --preset seed-decoupling-stable --out $(FIXED) --overwrite
	$(BIN)/vaediag analyze $(FIXED)
	@echo "== 4/4 both runs side by side"
	$(BIN)/vaediag compare $(DEMO) $(FIXED) --html runs/demo-compare.html --pdf runs/demo-compare.pdf
	@echo
	@echo "open: $(DEMO)/report.html (the diagnosis), $(DEMO)/grids/ (the grids it was trained with),"
	@echo "      runs/demo-compare.html (the run and its remedy side by side)"

test: $(STAMP)
	@bash .ci/install-test-tools
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check vaediag tests benchmarks reports
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/detectors.py
	$(BIN)/python benchmarks/case_study.py
	$(BIN)/python benchmarks/analyze_scale.py

# The example reports: the case study's natural runs (presets seed-decoupling and its remedy
# seed-decoupling-stable, seed-overfit: nothing planted) and the reference run
# (reports/reference.toml, two planted faults); each is analysed, its reports, findings and a
# screenshot of the HTML kept.
CASES = seed-decoupling seed-decoupling-stable seed-overfit

reports: $(STAMP)
	for preset in $(CASES); do \
	  $(BIN)/vaediag train --preset $$preset --out runs/$$preset --overwrite --no-progress && \
	  $(BIN)/vaediag analyze runs/$$preset --html reports/$$preset.html --pdf reports/$$preset.pdf && \
	  cp runs/$$preset/findings.json reports/$$preset-findings.json && \
	  $(BIN)/python reports/screenshot.py reports/$$preset.html reports/$$preset.png || exit 1; \
	done
	$(BIN)/vaediag train --config reports/reference.toml --out runs/reference --overwrite
	$(BIN)/vaediag analyze runs/reference --html reports/example.html --pdf reports/example.pdf
	cp runs/reference/findings.json reports/example-findings.json
	$(BIN)/python reports/screenshot.py reports/example.html reports/example.png

clean:
	rm -rf $(VENV) runs
