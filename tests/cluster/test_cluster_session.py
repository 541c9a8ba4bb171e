"""``model.session()`` on 2 Dask stages of a real LocalCluster: one request, the values
between traces kept on the stages (up the chain in the replies, down with the hidden
state), never on the client; the numbers of the in-process engine (and so of nnsight 0.8:
the session ports of tests/nnsight_ports.py run on 2 stages in test_cluster_nnsight.py);
nothing left on any stage after the session, whether it ends or fails."""

from __future__ import annotations

import pytest
import torch

from tpmlab.errors import ExecutionError

from .conftest import deploy

MODEL = "tiny-llama"
CLEAN, CORRUPT = "The Colosseum is in the city of", "The Eiffel Tower is located in"


@pytest.fixture(scope="module")
def pair(lab, ref_lab):
    model = deploy(lab, MODEL, 2)
    assert model.info.n_stages == 2
    yield model, ref_lab.model(MODEL)
    lab.undeploy(MODEL)


@pytest.fixture
def calls(backend, monkeypatch):
    seen: list[str] = []
    run, session = backend.run_values, backend.run_session_values
    monkeypatch.setattr(backend, "run_values",
                        lambda *a, **k: (seen.append("run"), run(*a, **k))[1])
    monkeypatch.setattr(backend, "run_session_values",
                        lambda *a, **k: (seen.append("session"), session(*a, **k))[1])
    return seen


def _both_ways(model):
    """Late layer (stage 1) into an early one (stage 0), and early into late."""
    last = model.adapter.n_layers - 1
    with model.session():
        with model.trace(CLEAN) as first:
            early = model.layers[0].output[:, 2]
            late = model.layers[last].output[:, -1]
        with model.trace(CORRUPT):
            model.layers[0].output[:, -1] = late
            a = model.output.logits[:, -1].save()
        with model.trace(CORRUPT):
            model.layers[last].output[:, 2] = early * 0.5
            b = model.output.logits[:, -1].save()
    return first, [a.value, b.value]


def _idle(backend, model):
    for stage in backend.memory(model.name):
        assert (stage["requests"], stage["held"], stage["kept"]) == (0, 0, 0), stage


def test_two_pass_patching_across_stages_is_one_request(backend, pair, calls):
    model, ref = pair
    first, ours = _both_ways(model)
    assert calls == ["session"]  # one request for the three traces
    assert first.result.values == {}  # the clean activations never reached the client
    assert first.result.meta["stages"] == 2
    _, theirs = _both_ways(ref)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # the patch changed the run (it is not the corrupt run's own logits)
    with model.trace(CORRUPT):
        plain = model.output.logits[:, -1].save()
    assert not torch.allclose(plain.value, ours[0])
    _idle(backend, model)


def test_a_failing_session_leaves_nothing_on_the_stages(backend, pair):
    model, _ = pair
    last = model.adapter.n_layers - 1
    with pytest.raises(ExecutionError, match="out of bounds"):
        with model.session():
            with model.trace(CLEAN):
                h = model.layers[last].output[:, -1]
            with model.trace(CORRUPT):
                idx = model.layers[0].output[0, 0, :1].abs().long() + 10**6
                model.layers[0].output[:, -1] = h[:, idx]
    _idle(backend, model)
    first, _ = _both_ways(model)  # the stages serve the next session as ever
    assert first.result.values == {}


def test_a_generation_in_a_session_on_stages(pair):
    model, ref = pair
    out = []
    for m in pair:
        with m.session():
            with m.generate(CLEAN, max_new_tokens=3) as gen:
                with gen.step(1):
                    h = m.layers[m.adapter.n_layers - 1].output[:, -1]
            with m.trace(CORRUPT):
                m.layers[0].output[:, -1] = h
                logits = m.output.logits[:, -1].save()
        out.append((gen.generated_ids[0], logits.value))
    assert torch.equal(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-5)


def test_behind_a_gateway_a_session_is_one_request_on_the_stages(backend, pair, calls, tmp_path):
    """A gateway over the Dask stages runs a session as one request too: the same numbers
    as the session sent to the stages directly, one ledger row, nothing left on a stage."""
    from tests.gateway.conftest import make_gateway, serve
    from tpmlab.gateway.units import CostModel

    model, _ = pair
    s = serve(make_gateway(backend, f"sqlite:///{tmp_path / 'ledger.db'}",
                           CostModel(fixed_seconds=0.01, seconds_per_token=0.001)))
    try:
        lab = s.lab("intervene")
        first, ours = _both_ways(lab.model(MODEL))
        assert calls == ["session"]  # three traces, one request to the stages
        assert first.result.values == {}
        assert [c["mode"] for c in lab.backend.usage()["charges"]] == ["session"]
        lab.close()
    finally:
        s.server.stop()
    _, theirs = _both_ways(model)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    _idle(backend, model)
