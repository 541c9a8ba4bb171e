#!/usr/bin/env bash
# Run the whole suite: lint, then pytest (unit, parity, cluster, notebooks).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export TPMLAB_HOME="${TPMLAB_HOME:-$PWD/.tpmlab-home}"
bash scripts/system-packages.sh
ruff check tpmlab lenses tests benchmarks
python -m pytest -q -p no:cacheprovider "$@"
