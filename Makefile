# atp-repro: one-command reproduce and test.
#
#   make reproduce   rebuild every table (tables/) and figure (figures/) in the mini world
#   make test        unit tests + the annotator's browser test + every notebook on smoke parameters
#                    + nbval over the results
#
# Both create a local virtual environment (.venv) on first use, with nothing installed beforehand
# but Python >= 3.10 and make. It is reinstalled when pyproject.toml changes.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
# CPU build of torch, pinned in the same pip step as the package (else pip may pull a multi-GB
# CUDA build). GPU machines: make TORCH_SPEC='torch==2.13.0' PIP_ARGS='--index-url ...' or use
# environment.yml.
TORCH_SPEC  ?= torch==2.13.0
EXTRAS      ?= train,dev
PIP_ARGS    ?=
JOBS        ?= 1
PYTEST_ARGS ?=

# CPU numerics (atp_repro/numerics.py): pinned to AVX2 code paths so that every x86-64 machine with
# AVX2 computes the same bits; `make reproduce FAST=1` lets torch use the widest path it finds
# (faster on AVX512 machines, results then differ in the last bits and, after training, more).
FAST ?= 0
ifeq ($(FAST),1)
export ATP_REPRO_NUMERICS := native
else
export ATP_REPRO_NUMERICS := pinned
export ATEN_CPU_CAPABILITY := avx2
export ONEDNN_MAX_CPU_ISA := AVX2
export MKL_CBWR := AVX2,STRICT
export MKL_DYNAMIC := FALSE
export OMP_NUM_THREADS := 2
export MKL_NUM_THREADS := 2
endif

VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.atp-repro-installed
SMOKE  := build/notebooks/smoke
NBVAL  := --nbval-lax --nbval-current-env -p no:cacheprovider

.PHONY: help venv hooks reproduce verify test test-all test-unit test-browser smoke nbval lab lint format clean distclean

help: ## list the targets
	@echo "atp-repro make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo "Variables: PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC=$(TORCH_SPEC) JOBS=$(JOBS) FAST=$(FAST)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "atp-repro needs Python >= 3.10, found " + sys.version.split()[0] + " (set PYTHON=...)")'
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(VPY) -m pip install $(PIP_ARGS) '$(TORCH_SPEC)' -e '.[$(EXTRAS)]'
	$(VPY) -m atp_repro install-git-filter
	@touch $(STAMP)

venv: $(STAMP) ## create/update the virtual environment (.venv) and the nbstripout git filter

hooks: $(STAMP) ## (re)configure the nbstripout git filter: notebooks are committed without outputs
	$(VPY) -m atp_repro install-git-filter

reproduce: $(STAMP) ## run every notebook with the committed mini-world defaults; writes tables/ and figures/
	$(VPY) -m atp_repro reproduce --jobs $(JOBS)

verify: $(STAMP) ## compare tables/ with the committed manifest of reproducible results (after make reproduce)
	$(VPY) -m atp_repro verify

test: $(STAMP) ## fast unit tests, the annotator in a browser, all notebooks on smoke parameters, then nbval
	$(VPY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS) tests
	$(VPY) -m pytest -m browser -rA $(PYTEST_ARGS) tests
	$(VPY) -m atp_repro run-notebooks --profile smoke --clean --jobs $(JOBS)
	$(VPY) -m pytest $(NBVAL) $(SMOKE)

test-unit: $(STAMP) ## unit tests (fast: -m "not slow and not browser")
	$(VPY) -m pytest -m "not slow and not browser" $(PYTEST_ARGS) tests

test-browser: $(STAMP) ## the pairwise annotator in JupyterLab, driven in headless Chromium (skipped without Chromium)
	$(VPY) -m pytest -m browser -rA $(PYTEST_ARGS) tests

test-all: $(STAMP) ## unit tests including the slow ones
	$(VPY) -m pytest $(PYTEST_ARGS) tests

smoke: $(STAMP) ## execute every notebook with notebooks/params/smoke/* into build/notebooks/smoke
	$(VPY) -m atp_repro run-notebooks --profile smoke --clean --jobs $(JOBS)

nbval: $(STAMP) ## nbval (lax) over the smoke-executed notebooks
	$(VPY) -m pytest $(NBVAL) $(SMOKE)

lab: $(STAMP) ## JupyterLab at the repository root, opened on index.ipynb (notebooks, tables, figures, run times)
	$(VPY) -m atp_repro index
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/index.ipynb

lint: $(STAMP) ## ruff check (code and notebooks)
	$(VPY) -m ruff check .

format: $(STAMP) ## ruff: apply safe fixes (imports, upgrades)
	$(VPY) -m ruff check --fix .

clean: ## remove build products and caches (keeps .venv, tables/, figures/ and trained artifacts)
	rm -rf build .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean ## also remove .venv and the cache of trained artifacts (.cache/)
	rm -rf $(VENV) .cache
