"""Engines and models for the lens tests.

``engine`` is parametrized over where plans run: ``"local"`` (in-process) and
``"dask"`` (pipeline stages on a local Dask cluster). A Dask engine that cannot start or
fails its smoke trace fails every test that asks for it: it is never skipped, so a broken
sharded engine cannot hide behind green lens tests.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TPMLAB_HOME", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".tpmlab-home"))

ENGINES = ["local", "dask"]
_labs: dict[str, object] = {}
_broken: dict[str, str] = {}


def _make_lab(kind: str):
    import tpmlab

    if kind == "local":
        return tpmlab.connect("local")
    lab = tpmlab.connect()
    if type(lab.backend).__name__ == "LocalBackend":
        lab.close()
        raise RuntimeError("tpmlab.connect() still runs models in-process")
    try:  # smoke check: one unpadded prompt and a padded batch give the local numbers
        model = lab.model("tiny-llama")
        with model.trace() as tr:
            with tr.invoke(input_ids=torch.tensor([1, 5, 9])):
                a = model.output.logits.save()
            with tr.invoke(input_ids=torch.tensor([1, 5])):
                model.output.logits.save()
        with model.trace(input_ids=torch.tensor([1, 5, 9])):
            b = model.output.logits.save()
        torch.testing.assert_close(a.value, b.value, rtol=1e-4, atol=1e-5)
    except Exception as e:
        lab.close()
        raise RuntimeError(f"the Dask engine fails a smoke trace: {type(e).__name__}: {e}") from e
    return lab


def lab_for(kind: str):
    if kind in _broken:
        pytest.fail(f"the {kind} engine is broken: {_broken[kind]}")
    if kind not in _labs:
        try:
            _labs[kind] = _make_lab(kind)
        except Exception as e:
            if kind == "local":
                raise
            _broken[kind] = str(e)
            pytest.fail(f"the {kind} engine is broken: {e}")
    return _labs[kind]


@pytest.fixture(scope="session", autouse=True)
def _close_labs():
    yield
    for lab in _labs.values():
        lab.close()
    _labs.clear()


@pytest.fixture(params=ENGINES)
def engine(request):
    """A connected lab on each engine."""
    return lab_for(request.param)


@pytest.fixture(scope="session")
def lab():
    """The in-process engine."""
    return lab_for("local")


def hf_model(lab, name: str) -> torch.nn.Module:
    """The plain Hugging Face module holding the weights the local engine runs (for references)."""
    lab.model(name)
    return lab.backend.host(name).model


def hf_logits_hidden(hf, ids: torch.Tensor, layer_paths: list[str]) -> tuple[torch.Tensor, dict]:
    """A plain forward with hooks: the logits ``[pos, vocab]`` and each path's output."""
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for path in layer_paths:
        def hook(mod, args, out, path=path):
            outs[path] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        handles.append(hf.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = hf(input_ids=ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, outs
