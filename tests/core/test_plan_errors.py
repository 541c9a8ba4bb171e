"""Bad plans are refused before anything runs, with one error naming the node and the user's line."""

from __future__ import annotations

import pickle

import pytest
import torch

import tpmlab
from tpmlab.errors import (
    BackwardFlowError,
    ExecutionError,
    LimitError,
    PathError,
    SchemaError,
    ShapeError,
    UnknownOpError,
)
from tpmlab.ir.codec import decode_plan, encode_plan
from tpmlab.ir.plan import Node
from tpmlab.ir.validate import Limits

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model("tiny-llama")


def test_unknown_op_names_node(model):
    with pytest.raises(UnknownOpError, match="not allowed") as err:
        with model.trace(PROMPT) as tr:
            h = model.layers[0].output
            tr.record("system", [h])  # a hand-made node outside the whitelist
    assert err.value.node is not None
    assert "test_plan_errors.py" in err.value.line


def test_unknown_proxy_method_is_refused_on_the_spot(model):
    with pytest.raises(tpmlab.TpmlabError):
        with model.trace(PROMPT):
            torch.nn.functional.dropout(model.layers[0].output)


def test_missing_path_names_module_and_suggests(model):
    with pytest.raises(AttributeError, match="no submodule 'mlpp'"):
        with model.trace(PROMPT):
            model.layers[0].mlpp.output.save()
    with pytest.raises(IndexError, match="out of range"):
        model.layers[99]


def test_path_error_from_a_raw_plan(model):
    with model.trace(PROMPT) as tr:
        model.layers[0].output.save()
    plan = tr.plan()
    plan.nodes[0].path = "model.layers.0.mlpp"
    with pytest.raises(PathError, match=r"no module 'model.layers.0.mlpp'.*did you mean"):
        model.lab.run(model.name, encode_plan(plan))


def test_backward_flow_names_both_points(model):
    with pytest.raises(BackwardFlowError) as err:
        with model.trace(PROMPT):
            late = model.layers[3].output
            model.layers[1].output[:, -1] = late[:, -1]
    msg = str(err.value)
    assert "model.layers.1.output" in msg and "model.layers.3.output" in msg
    assert "test_plan_errors.py" in err.value.line


def test_module_applied_to_later_value_is_backward(model):
    with pytest.raises(BackwardFlowError, match="model.layers.0"):
        with model.trace(PROMPT):
            model.layers[0](model.layers[3].output).save()


def test_write_of_wrong_shape(model):
    with pytest.raises(ShapeError, match="does not fit") as err:
        with model.trace(PROMPT):
            model.layers[2].output[:, -1] += torch.ones(7)
    assert err.value.node is not None and "test_plan_errors.py" in err.value.line
    with pytest.raises(ShapeError, match=r"has shape \(1, 10, 64\)"):
        with model.trace(PROMPT):
            model.layers[2].output = torch.ones(1, 3, 64)


def test_save_over_limit(local_lab):
    from tpmlab.runtime.backend import LocalBackend

    lab = tpmlab.Lab(LocalBackend(limits=Limits(max_saved_bytes=10_000)))
    small = lab.model("tiny-llama")
    with pytest.raises(LimitError, match="saves 1,966,080 bytes, over the limit of 10,000"):
        with small.trace(PROMPT):
            small.output.logits.save()  # [1, 10, 49152] float32
    with small.trace(PROMPT):  # a small save is fine on the same deployment
        ok = small.output.logits[:, -1].argmax(-1).save()
    assert ok.value.shape == (1,)


def test_runtime_failure_names_node_and_leaves_model_usable(model):
    with pytest.raises(ExecutionError, match="index") as err:
        with model.trace(PROMPT):
            idx = model.layers[0].output.argmax(-1)  # positions of size up to 63, not valid rows
            model.layers[0].output[idx].save()
    assert err.value.node is not None
    with model.trace(PROMPT):
        fine = model.layers[0].output.save()
    assert fine.value.shape == (1, 10, 64)
    hf = model.lab.backend.host(model.name).model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in hf.modules())


def test_plan_without_interventions_installs_no_hooks(model, monkeypatch):
    calls = []
    original = torch.nn.Module.register_forward_hook
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",
                        lambda self, *a, **k: calls.append(self) or original(self, *a, **k))
    with model.trace(PROMPT):
        pass
    assert calls == []


def test_reading_value_before_run_is_clear(model):
    with model.trace(PROMPT):
        h = model.layers[0].output.save()
        with pytest.raises(tpmlab.TpmlabError, match="after the `with` block"):
            _ = h.value
    assert h.value is not None
    with model.trace(PROMPT):
        with pytest.raises(tpmlab.TpmlabError, match="truth value"):
            if model.layers[0].output:
                pass


def test_codec_round_trip_and_digest_ignores_lines(model):
    with model.trace(PROMPT) as tr:
        model.layers[1].output[:, -1] *= 2.0
        model.layers[1].output[..., 3:5].softmax(-1).topk(1).values.save()
    plan = tr.plan()
    blob = encode_plan(plan)
    back = decode_plan(blob)
    assert [(n.op, n.args, n.kwargs, n.path) for n in back.nodes] == \
        [(n.op, n.args, n.kwargs, n.path) for n in plan.nodes]
    from tpmlab.runtime.request import plan_digest

    moved = decode_plan(blob)
    for n in moved.nodes:
        n.line = "elsewhere:1"
    assert plan_digest(moved) == plan_digest(back)


@pytest.mark.parametrize("payload", [
    pickle.dumps({"nodes": []}),
    b"\x00" * 4,
    b"\xff" * 64,
    (10**9).to_bytes(8, "little") + b"{}",
])
def test_hostile_payloads_are_schema_errors(model, payload):
    with pytest.raises(SchemaError):
        model.lab.run(model.name, payload)
    with model.trace(PROMPT):
        ok = model.layers[0].output.save()
    assert ok.value is not None


def test_unknown_fields_and_markers_are_refused(model):
    with model.trace(PROMPT) as tr:
        model.layers[0].output.save()
    plan = tr.plan()
    plan.nodes.append(Node(id=99, op="getattr", args=[tr.plan().nodes[0].args, "__class__"]))
    with pytest.raises((UnknownOpError, SchemaError)):
        model.lab.run(model.name, encode_plan(plan))


def test_result_records_provenance(model):
    with model.trace(PROMPT) as tr:
        model.layers[0].output.save()
    assert tr.result.model_version == model.version and model.version.startswith("v2:")
    assert tr.result.plan_digest.startswith("sha256:")
    assert tr.result.tpmlab_version == tpmlab.__version__


@pytest.mark.slow
def test_default_model_says_paris(default_model):
    with default_model.trace(PROMPT):
        top = default_model.output.logits[:, -1].argmax(-1).save()
    assert default_model.tokenizer.decode(top.value) == " Paris"


@pytest.mark.slow
def test_tied_unembedding_weight_is_readable_by_both_names(default_model):
    with default_model.trace(PROMPT):
        w_u = default_model.unembed.param("weight")
        w_e = default_model.embed.param("weight")
        same = (w_u == w_e).all().save()
    assert bool(same.value)


def test_saved_named_tuples_read_the_same_on_every_path(model):
    from tpmlab.ir.codec import decode_result, encode_result

    with model.trace(PROMPT):
        top = model.output.logits[0, -1].topk(3).save()
    values, indices = top.value
    assert torch.equal(top.value.values, values) and top.value.indices.shape == (3,)
    back, _ = decode_result(encode_result({0: top.value}, {}))
    assert torch.equal(back[0].values, values) and torch.equal(back[0][1], indices)


def test_saves_of_unknown_size_are_held_to_the_limit_at_run_time():
    from tpmlab.runtime.backend import LocalBackend

    lab = tpmlab.Lab(LocalBackend(limits=Limits(max_saved_bytes=200_000)))
    small = lab.model("tiny-llama")
    # shapes after the prompt pass are not known before running: the limit applies as it runs
    with pytest.raises(LimitError, match="over the limit of 200,000 bytes") as err:
        with small.generate(PROMPT, max_new_tokens=3) as gen:
            with gen.steps(1, None):
                small.output.logits.save()  # [1, 1, 49152] float32 = 196,608 bytes a step
    assert err.value.node is not None
    with small.trace(PROMPT):  # the deployment carries on
        ok = small.layers[0].output.save()
    assert ok.value.shape == (1, 10, 64)
