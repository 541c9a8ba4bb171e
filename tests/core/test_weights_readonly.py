"""Deployed weights are read-only to plans (contract 8): every write to a parameter that
validation can see is refused, naming the node and the user's line; a write it misses
fails its request at run time, and the weights are restored from their source."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tpmlab
from tpmlab.errors import PlanError, UnknownOpError, WeightsChangedError
from tpmlab.ir import ops as irops
from tpmlab.runtime.backend import LocalBackend

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def lab():
    lab = tpmlab.Lab(LocalBackend(device="cpu", dtype=torch.float32))
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def model(lab):
    return lab.model("tiny-llama")


def logits(m) -> torch.Tensor:
    with m.trace(PROMPT):
        out = m.output.logits.save()
    return out.value


def _norm(m):
    return m.model.norm.param("weight")


WRITES = {
    "in-place method": lambda m: _norm(m).mul_(0),
    "in-place operator": lambda m: _norm(m).__imul__(0),
    "zero_": lambda m: _norm(m).zero_(),
    "fill_": lambda m: _norm(m).fill_(1.0),
    "item assignment": lambda m: _norm(m).__setitem__(slice(0, 3), 0.0),
    "through a view": lambda m: _norm(m)[:4].add_(1),
    "through .T": lambda m: m.model.layers[0].mlp.up_proj.param("weight").T[0].zero_(),
    "through float()": lambda m: _norm(m).float().zero_(),
    "through detach()": lambda m: _norm(m).detach().mul_(0),
    "through to()": lambda m: _norm(m).to(torch.float32).mul_(0),
    "through contiguous()": lambda m: _norm(m).contiguous().mul_(0),
    "through reshape()": lambda m: _norm(m).reshape(8, 8).mul_(0),
    "through +x": lambda m: (+_norm(m)).mul_(0),
    "through einsum": lambda m: torch.einsum("i->i", _norm(m)).mul_(0),
    "copy_ into it": lambda m: _norm(m).copy_(torch.zeros(64)),
    "as a module's new output": lambda m: setattr(m.model.norm, "output",
                                                  _norm(m).expand(1, 10, 64)),
}


@pytest.mark.parametrize("route", list(WRITES))
def test_writes_to_parameters_are_refused_at_validation(model, route):
    before = logits(model)
    with pytest.raises(PlanError, match="read-only to plans") as err:
        with model.trace(PROMPT):
            WRITES[route](model)
            model.output.logits.save()
    assert "model.norm.weight" in str(err.value) or "up_proj.weight" in str(err.value)
    assert err.value.node is not None and "test_weights_readonly.py" in err.value.line
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_containers_carry_the_parameter(model):
    """make_list + getitem (hand-made plan nodes) hand back the parameter itself."""
    with pytest.raises(PlanError, match="parameter model.norm.weight"):
        with model.trace(PROMPT) as tr:
            held = tr.record("make_list", [_norm(model)])
            held[0].mul_(0)


def test_out_keyword_is_refused_everywhere(model):
    with pytest.raises(UnknownOpError, match="keyword out= is not allowed") as err:
        with model.trace(PROMPT):
            w = _norm(model)
            torch.cat([w], out=w)
    assert "test_weights_readonly.py" in err.value.line
    with pytest.raises(UnknownOpError, match="keyword inplace= is not allowed"):
        with model.trace(PROMPT):
            torch.nn.functional.silu(model.layers[0].output, inplace=True)
    # the positional forms of those arguments are not accepted either
    with pytest.raises(PlanError):
        with model.trace(PROMPT):
            torch.nn.functional.silu(model.layers[0].output, True)


def test_reading_and_copying_parameters_still_works(model):
    with model.trace(PROMPT):
        w = _norm(model).clone()
        w.mul_(2)  # a copy is the plan's own
        doubled = w.save()
        h = model.layers[0].output
        h[:, -1] += model.layers[0].mlp.down_proj.param("weight")[:, 0]
        out = model.output.logits.save()
    hf = model.lab.backend.host(model.name).model
    torch.testing.assert_close(doubled.value, 2 * hf.model.norm.weight)
    assert out.value.shape[-1] == 49152


# -- the run-time guard -----------------------------------------------------------------------------
@pytest.fixture
def blind_validation(monkeypatch):
    """Make validation blind to ``mul_`` writing its argument, as a mistake in the op table
    would: the plan passes validation and the runner writes the weight."""
    monkeypatch.setitem(irops.OPS, "mul_", dataclasses.replace(irops.OPS["mul_"], mutates=False))


@pytest.mark.parametrize("name,path", [("tiny-llama", "model.norm"),
                                       ("tiny-gpt2", "transformer.wte")])  # tied to lm_head
def test_runtime_guard_fails_the_request_and_restores(lab, blind_validation, name, path):
    m = lab.model(name)
    backend = lab.backend
    host = backend.host(name)
    before = logits(m)
    restores = backend.weight_restores()[name]
    with pytest.raises(WeightsChangedError, match=path.replace(".", r"\.") + r"\.weight"):
        with m.trace(PROMPT):
            m.envoy(path).param("weight").mul_(0)
            m.output.logits.save()
    assert backend.weight_restores()[name] == restores + 1
    assert host.weights.changed() == []
    torch.testing.assert_close(logits(m), before, rtol=0, atol=0)
    assert backend.weight_restores()[name] == restores + 1  # a good request restores nothing


def test_runtime_guard_restores_buffers(model):
    """Non-persistent buffers (rotary frequencies) are recomputed as a load does."""
    host = model.lab.backend.host(model.name)
    before = logits(model)
    with torch.no_grad():
        host.model.model.rotary_emb.inv_freq.mul_(3)
    with pytest.raises(WeightsChangedError, match="rotary_emb.inv_freq"):
        host.weights.check()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_runtime_guard_fails_requests_while_the_source_cannot_restore(model, monkeypatch):
    host = model.lab.backend.host(model.name)
    before = logits(model)
    real_load = host.weights.source.load
    monkeypatch.setattr(host.weights.source, "load",
                        lambda **kw: (_ for _ in ()).throw(OSError("weights file gone")))
    with torch.no_grad():
        host.model.model.norm.weight.add_(1)
    with pytest.raises(WeightsChangedError, match="could not be restored.*weights file gone"):
        host.weights.check()
    with pytest.raises(WeightsChangedError, match="could not be restored"):
        logits(model)  # refused before it runs on damaged weights
    monkeypatch.setattr(host.weights.source, "load", real_load)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_guard_watches_every_weight_once_and_keeps_no_copy(model):
    host = model.lab.backend.host(model.name)
    live = {id(t) for t in [*host.model.parameters(), *host.model.buffers()]}
    assert {id(t) for t in host.weights._tensors} == live
    assert len(host.weights) == len(live)
