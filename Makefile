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

test: setup
	bash scripts/test.sh

bench: setup
	$(PY) -m benchmarks.local_overhead
