# mppool developer tasks. Every target sets up the virtual environment it needs itself:
# .venv is (re)built from pyproject.toml whenever pyproject.toml changes.
#
#   make demo    supervisor + workers sharing a budget, with a final check that the bound held
#                (installs the package alone, not the test/lint toolchain)
#   make test    the whole test suite, in parallel (pytest-xdist)
#   make lint    ruff + mypy + no import circle (scripts/check_imports.py)
#   make bench   benchmarks (scripts/bench.py), ratios against peers measured in the same run
#   make docs    build the documentation site (mkdocs --strict) into site/
#   make clean   remove caches and build output (make distclean also removes .venv)

SHELL := /bin/bash

# python3.11 if it is on PATH, else python3 (pyproject.toml requires >= 3.11).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)

VENV        := .venv
BIN         := $(VENV)/bin
RUN_STAMP   := $(VENV)/.mppool-installed-runtime
STAMP       := $(VENV)/.mppool-installed
BENCH_STAMP := $(VENV)/.mppool-installed-bench
DOCS_STAMP  := $(VENV)/.mppool-installed-docs

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint bench docs clean distclean venv

venv: $(STAMP)

# Two stamps: the package alone (what `make demo` needs, a few seconds), and on top of it the
# test and lint toolchain (what `make test` and `make lint` need).
$(RUN_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: neither python3.11 nor python3 is on PATH" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e .
	@touch $@

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install -e '.[test,lint]'
	@touch $@

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[test,lint,bench]'
	@touch $@

# The package only: no test or lint toolchain.
demo: $(RUN_STAMP)
	$(BIN)/mppool demo

# One command line; README.md and .ci/run use `make test` and nothing else.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto

# Runs both tools even when the first one fails, then fails if either did.
lint: $(STAMP)
	@status=0; \
	echo "$(BIN)/ruff check mppool tests scripts"; \
	$(BIN)/ruff check mppool tests scripts || status=1; \
	echo "$(BIN)/mypy"; \
	$(BIN)/mypy || status=1; \
	echo "$(BIN)/python scripts/check_imports.py"; \
	$(BIN)/python scripts/check_imports.py || status=1; \
	exit $$status

bench: $(BENCH_STAMP)
	$(BIN)/python scripts/bench.py

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[docs]'
	@touch $@

# --strict: a broken link, a missing anchor or a docstring mkdocstrings cannot render fails
# the build. NO_MKDOCS_2_WARNING silences mkdocs-material's banner about MkDocs 2.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf build dist site bench-results .pytest_cache .mypy_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
