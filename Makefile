# The README's two commands are `make lab` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lab test lint bench

setup:
	bash scripts/setup.sh

lab: setup
	$(VENV)/bin/tpmlab lab

lint:
	$(VENV)/bin/ruff check tpmlab lenses tests benchmarks

test: setup
	bash scripts/test.sh

bench: setup
	$(PY) -m benchmarks.local_overhead
