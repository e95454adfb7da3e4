# The course's entry points. The two commands of the README:
#     make lesson-01      set up what is missing, run lesson 01 (any lesson: lesson-NN)
#     make test-all       set up what is missing, run the whole test suite
# With a Python that already has the packages (our GPU machine has no network):
#     make test-all PYTHON=python3
# `make help` lists everything.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# PYTHON given: use it as it is, install nothing. Not given: a virtual environment in
# .venv, made from requirements.txt the first time (and again when it changes).
BOOTSTRAP_PYTHON ?= python3
VENV := .venv
ifeq ($(strip $(PYTHON)),)
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
else
PY := $(PYTHON)
SETUP :=
endif

ARGS ?=
JOBS ?= 2
LESSON ?=

.PHONY: help setup doctor test-all test-fast bench profile sanitize mutate clean

help: ## list the targets
	@echo "make lesson-NN [ARGS='--bench|--cpu|--help']  run lesson NN (01..09)"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "make %-34s %s\n", $$1, $$2}'
	@echo "Variables: PYTHON=python3 (use an interpreter that has the packages, install nothing),"
	@echo "           COURSE_MODE=cpu|gpu|auto, JOBS=N (parallel test workers), LESSON=NN"

$(VENV)/.installed: requirements.txt
	@$(BOOTSTRAP_PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "error: Python 3.10+ is needed, found " + sys.version.split()[0] + ": set BOOTSTRAP_PYTHON=python3.X")' \
	  || exit 1
	@echo "Setting up $(VENV) from requirements.txt (first run: a minute or two)..."
	@test -x $(VENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q --upgrade pip
	@$(VENV)/bin/python -m pip install -q -r requirements.txt \
	  || { echo "error: installing requirements.txt failed (see above); no network? use PYTHON=python3 with an interpreter that has the packages"; exit 1; }
	@touch $@

setup: $(SETUP) ## create .venv and install requirements.txt (done automatically)

lesson-%: $(SETUP)
	@$(PY) scripts/run_lesson.py $* $(ARGS)

doctor: $(SETUP) ## what will be used: GPU or emulation, driver, versions, known-bad combinations
	@$(PY) scripts/doctor.py

test-all: $(SETUP) ## the whole test suite (emulation without a GPU, GPU tests with one)
	@$(PY) scripts/doctor.py --short
	@$(PY) -m pytest -n $(JOBS) $(PYTEST_ARGS)

test-fast: $(SETUP) ## the suite without the slow simulator tests
	@$(PY) -m pytest -n $(JOBS) -m "not slow" $(PYTEST_ARGS)

bench: $(SETUP) ## every lesson's benchmark on the GPU (LESSON=NN for one), results and plots
	@$(PY) scripts/bench_all.py $(if $(LESSON),--lesson $(LESSON),)

profile: $(SETUP) ## Nsight Compute on a lesson's main kernel: make profile LESSON=08
	@$(PY) scripts/profile.py --lesson $(LESSON)

sanitize: $(SETUP) ## compute-sanitizer memcheck+racecheck on a Numba lesson: make sanitize LESSON=04
	@$(PY) scripts/sanitize.py --lesson $(LESSON)

mutate: $(SETUP) ## mutation-test a lesson's kernels: make mutate LESSON=02 [ARGS='--list|--only 7|--max 5']
	@test -n "$(LESSON)" || { echo "error: which lesson? make mutate LESSON=02"; exit 1; }
	@$(PY) scripts/mutate.py $(LESSON) --python $(PY) $(ARGS)

clean: ## remove caches (keeps .venv)
	find . -name __pycache__ -prune -exec rm -rf {} + ; rm -rf .pytest_cache
