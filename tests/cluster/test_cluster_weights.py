"""Deployed weights are read-only to plans on Dask stages too (contract 8): validation
refuses writes to parameters, and a write it misses fails the request on the stage that
holds the weight, which restores it from the model's source before the next request."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tpmlab.errors import PlanError, WeightsChangedError

from .conftest import deploy

pytestmark = pytest.mark.slow
MODEL = "tiny-llama"
PROMPT = "The Eiffel Tower is located in the city of"


# Two runs of one trace on a stage's CPU kernels can differ in the last bits (the kernels'
# code path follows the buffers' alignment); a changed weight moves the logits by far more.
TIE = 1e-5


@pytest.fixture(scope="module")
def model(lab):
    m = deploy(lab, MODEL, 2)
    assert m.info.n_stages == 2
    yield m
    lab.undeploy(MODEL)


def logits(m) -> torch.Tensor:
    with m.trace(PROMPT):
        out = m.output.logits.save()
    return out.value


def _set_mul_mutates(mutates: bool, dask_worker=None) -> None:
    from tpmlab.ir import ops

    ops.OPS["mul_"] = dataclasses.replace(ops.OPS["mul_"], mutates=mutates)


@pytest.fixture
def blind_validation(backend):
    """Validation on every worker (and here) blind to ``mul_`` writing its argument, as a
    mistake in the op table would make it."""
    backend.client.run(_set_mul_mutates, False)
    _set_mul_mutates(False)
    yield
    backend.client.run(_set_mul_mutates, True)
    _set_mul_mutates(True)


def test_writes_to_parameters_are_refused_on_the_cluster(model):
    before = logits(model)
    with pytest.raises(PlanError, match="model.norm.weight.*read-only to plans") as err:
        with model.trace(PROMPT):
            model.model.norm.param("weight").float()[:4].zero_()
    assert "test_cluster_weights.py" in err.value.line
    torch.testing.assert_close(logits(model), before, rtol=0, atol=TIE)


@pytest.mark.parametrize("path", ["model.layers.0.input_layernorm", "model.norm"],
                         ids=["stage0", "stage1"])
def test_runtime_guard_on_each_stage(model, backend, blind_validation, path):
    before = logits(model)
    restores = backend.weight_restores()[MODEL]
    with pytest.raises(WeightsChangedError, match=f"{path}.weight.*restored"):
        with model.trace(PROMPT):
            model.envoy(path).param("weight").mul_(0)
            model.output.logits.save()
    assert backend.weight_restores()[MODEL] == restores + 1
    torch.testing.assert_close(logits(model), before, rtol=0, atol=TIE)


def test_runtime_guard_during_generation(model, backend, blind_validation):
    before = logits(model)
    restores = backend.weight_restores()[MODEL]
    with pytest.raises(WeightsChangedError, match="model.norm.weight"):
        with model.generate(PROMPT, max_new_tokens=3) as gen:
            with gen.step(1):
                model.model.norm.param("weight").mul_(0)
    assert backend.weight_restores()[MODEL] == restores + 1
    torch.testing.assert_close(logits(model), before, rtol=0, atol=TIE)
    assert [s["requests"] + s["held"] for s in backend.memory(MODEL)] == [0, 0]
