# Quick start (a fresh machine):
#   make demo   - set up, build, and train the tiny decoder with and without DP, then audit both
#   make test   - set up, build, and run the test suite
#
# SYSTEM_PYTHON=1 uses the machine's python3 as it is (no virtual environment, no package
# registry needed: e.g. a GPU machine that already has torch/triton/pytest); the extension is
# still built in place.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv

ifeq ($(SYSTEM_PYTHON),1)
PYTHON := python3
ENV_STAMP :=
PYTEST_ARGS ?=
else
PYTHON := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.installed
# two pytest workers (pytest-xdist, pinned in requirements.txt): about 5.5 minutes for the
# suite on the 2-core CPU box
PYTEST_ARGS ?= -n 2
endif

BUILD_STAMP := build/.ext-$(notdir $(PYTHON))$(SYSTEM_PYTHON)
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh) setup.py

.PHONY: setup build demo test bench info clean

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

setup: $(ENV_STAMP)

# Builds vaultkern._C against the installed torch (hence --no-build-isolation; see setup.py).
$(BUILD_STAMP): $(ENV_STAMP) $(CSRC)
	$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

demo: build
	$(PYTHON) -m vaultkern train --demo

test: build
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

bench: build
	$(PYTHON) -m vaultkern bench --size cpu

info: build
	$(PYTHON) -m vaultkern info

clean:
	rm -rf build *.egg-info vaultkern/_C*.so
