# The README's two commands are `make lab` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lab test lint bench

# Returns in about a second when the environment is already complete (see scripts/setup.sh);
# `make setup FORCE=1` reinstalls anyway.
setup:
	TPMLAB_SETUP_FORCE=$(FORCE) bash scripts/setup.sh

lab: setup
	$(VENV)/bin/tpmlab lab

lint:
	$(VENV)/bin/ruff check tpmlab lenses tests benchmarks
	$(PY) docs/build_api.py --check

# The suite's own home for converted models (scripts/test.sh uses it too): setup converts the
# default model there, not into the user's.
test: export TPMLAB_HOME := $(or $(TPMLAB_HOME),$(CURDIR)/.tpmlab-home)
test: setup
	bash scripts/test.sh

bench: setup
	$(PY) -m benchmarks.local_overhead
