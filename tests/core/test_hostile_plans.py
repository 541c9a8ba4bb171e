"""Hostile plan documents: decoding and validation answer every one with a named
:class:`~tpmlab.errors.PlanError` subclass (a 4xx at the gateway), never with another
exception (a 500), and the engine goes on serving.

A corpus of hand-made attacks, each with the error it must get, and a property test
that throws random plan documents of the right rough shape at the codec and the
validator (bounded: a few seconds, so it runs in CI)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from tpmlab.errors import (
    ExecutionError,
    LimitError,
    PathError,
    PlanError,
    SchemaError,
    ShapeError,
    UnknownOpError,
)
from tpmlab.ir import codec, validate
from tpmlab.ir.codec import decode_plan
from tpmlab.ir.ops import OPS

MODEL = "tiny-llama"
VOCAB = 49152
IDS = torch.tensor([1, 2, 3])


@pytest.fixture(scope="module")
def model(local_lab):
    return local_lab.model(MODEL)


@pytest.fixture(scope="module")
def host(model):
    return model.lab.backend.host(MODEL)


def blob(node_docs=(), tensors=None, **fields) -> bytes:
    doc = {"schema": 1, "model": MODEL, "model_version": "", "mode": "trace",
           "invokes": [{"kind": "tokens", "tensors": ["in0"]}], "nodes": list(node_docs), **fields}
    return st_save(tensors if tensors is not None else {"in0": IDS},
                   metadata={"tpmlab": json.dumps(doc)})


def point(path="model.layers.0", io="output", id=0, **kw):
    return {"id": id, "op": "point", "path": path, "io": io, "invoke": 0, **kw}


def node(id, op, *args, **fields):
    return {"id": id, "op": op, "args": list(args), **fields}


def ref(i):
    return {"$ref": i}


def nested(depth):
    v = [ref(0)]
    for _ in range(depth):
        v = [v]
    return v


HUGE = 2**70
HOSTILE = {
    # huge numbers, NaN and infinities
    "2**70 slice": (SchemaError, "64-bit", [point(), node(1, "getitem", ref(0), {"$slice": [0, HUGE, None]})]),
    "2**70 index": (SchemaError, "64-bit", [point(), node(1, "getitem", ref(0), {"$tuple": [-HUGE]})]),
    "NaN slice": (ShapeError, "getitem", [point(), node(1, "getitem", ref(0), {"$slice": [{"$float": "nan"}, None, None]})]),
    "NaN size": (ShapeError, "zeros", [node(0, "zeros", math.nan)]),
    "inf size": (ShapeError, "zeros", [node(0, "zeros", {"$float": "inf"})]),
    "inf arange": (ShapeError, "arange", [node(0, "arange", 0, {"$float": "inf"})]),
    "negative dim": (ShapeError, "zeros", [node(0, "zeros", -5)]),
    "oversized dims": (ShapeError, "zeros", [node(0, "zeros", 2**40, 2**40)]),
    "terabyte constant": (LimitError, "over the limit", [node(0, "zeros", 2**40)]),
    "huge expand": (ShapeError, "expand", [point(), node(1, "expand", ref(0), 2**62, 2**62, 64)]),
    "huge view": (ShapeError, "view", [point(), node(1, "view", ref(0), 2**62)]),
    "float pow overflow": (ShapeError, "pow", [node(0, "pow", 2.0, 100000)]),
    "int pow bomb": (ShapeError, "64-bit", [node(0, "pow", 10, 10**18)]),
    "division by zero": (ShapeError, "floordiv", [node(0, "floordiv", 1, 0)]),
    "list repetition bomb": (LimitError, "over the limit", [node(0, "make_list", 0), node(1, "mul", ref(0), 2**40)]),
    "string repetition bomb": (LimitError, "over the limit", [node(0, "mul", "x", 2**40)]),
    "format bomb": (ShapeError, "formatting", [node(0, "mod", "%0999999999d", 1)]),
    # nesting and markers
    "deep nesting": (SchemaError, "nested deeper", [point(), node(1, "make_list", *nested(200))]),
    "nesting past the JSON parser": (SchemaError, "not a tpmlab plan", st_save({"in0": IDS}, metadata={
        "tpmlab": '{"schema": 1, "nodes": ' + "[" * 50_000 + "]" * 50_000 + "}"})),
    "unknown marker": (SchemaError, "unknown value marker", [node(0, "make_list", {"$eval": "1"})]),
    "two markers in one": (SchemaError, "malformed value", [node(0, "make_list", {"$ref": 0, "$tensor": "in0"})]),
    "reference to itself": (SchemaError, "does not come before", [node(0, "neg", ref(0))]),
    "reference to a later node": (SchemaError, "does not come before", [node(0, "save", ref(5))]),
    "reference of the wrong type": (SchemaError, "malformed reference", [node(0, "neg", {"$ref": "0"})]),
    "missing tensor": (SchemaError, "unknown tensor", [node(0, "neg", {"$tensor": "nope"})]),
    # dtypes that are not dtypes
    "dtype float128": (SchemaError, "dtype", [point(), node(1, "to", ref(0), {"$dtype": "float128"})]),
    "dtype of a list": (SchemaError, "dtype", [point(), node(1, "to", ref(0), {"$dtype": ["float32"]})]),
    "dtype Tensor": (SchemaError, "dtype", [point(), node(1, "to", ref(0), {"$dtype": "Tensor"})]),
    # attributes and fields
    "dunder attribute": (UnknownOpError, "__class__", [point(), node(1, "getattr", ref(0), "__class__")]),
    "unknown attribute": (ShapeError, "not allowed", [point(), node(1, "getattr", ref(0), "grad_fn")]),
    "missing field": (ShapeError, "nope", [point(""), node(1, "getitem", ref(0), "nope")]),
    "missing dotted field": (ShapeError, "nope", [point(""), node(1, "getattr", ref(0), "nope")]),
    "dunder keyword": (SchemaError, "__globals__", [point(), node(1, "sum", ref(0), kwargs={"__globals__": 1})]),
    "out keyword": (UnknownOpError, "out=", [point(), node(1, "neg", ref(0), kwargs={"out": ref(0)})]),
    "first argument by keyword": (ShapeError, "mul_", [point(), node(1, "mul_", kwargs={"x": ref(0), "other": 0})]),
    # wrong arities and shapes of structural ops
    "getattr without a name": (UnknownOpError, "attribute", [point(), node(1, "getattr", ref(0))]),
    "set_point of one value": (SchemaError, "set_point needs", [point(), node(1, "set_point", ref(0), path="model.layers.0", io="output")]),
    "set_point of a non-point": (SchemaError, "set_point needs", [point(), node(1, "neg", ref(0)), node(2, "set_point", ref(1), ref(1), path="model.layers.0", io="output")]),
    "set_point elsewhere": (SchemaError, "its point", [point(), node(1, "set_point", ref(0), ref(0), path="model.layers.1", io="output")]),
    "save of nothing": (SchemaError, "save takes one value", [node(0, "save")]),
    "save of two": (SchemaError, "save takes one value", [point(), node(1, "save", ref(0), ref(0))]),
    "param without a name": (PathError, "no parameter", [node(0, "param", path="model.norm")]),
    "param named by a number": (PathError, "no parameter", [node(0, "param", 3, path="model.norm")]),
    "point sideways": (SchemaError, "io must be", [point(io="sideways")]),
    "point of a missing invoke": (SchemaError, "invoke 5 does not exist", [point(invoke=5)]),
    "point of a dunder path": (PathError, "no module", [point("model.__class__")]),
    "setitem of one argument": (ShapeError, "setitem", [point(), node(1, "setitem", ref(0))]),
    "size of a missing dim": (ShapeError, "size", [point(), node(1, "size", ref(0), 99)]),
    "einsum nonsense": (ShapeError, "einsum", [point(), node(1, "einsum", "??->", ref(0))]),
    "unknown op": (UnknownOpError, "not allowed", [node(0, "system", "ls")]),
    "op of the wrong type": (SchemaError, "op name", [{"id": 0, "op": 3}]),
    "args not a list": (SchemaError, "args must be a list", [{"id": 0, "op": "neg", "args": {"$ref": 0}}]),
    "unknown node field": (SchemaError, "unknown fields", [{"id": 0, "op": "neg", "code": "x"}]),
    "negative node id": (SchemaError, "non-negative", [node(-1, "arange", 3)]),
    "node id true": (SchemaError, "integer id", [node(True, "arange", 3)]),
    "node id 2**70": (SchemaError, "integer id", [node(HUGE, "arange", 3)]),
    "duplicate node id": (SchemaError, "duplicate", [node(0, "arange", 3), node(0, "arange", 3)]),
    "steps 2**70": (SchemaError, "steps", [node(0, "arange", 3, steps=[0, HUGE])]),
    "steps of text": (SchemaError, "steps", [node(0, "arange", 3, steps=["a", None])]),
    "steps past the end": (SchemaError, "steps", [node(0, "arange", 3, steps=[4, 5])]),
    "embedding of ids past its rows": (SchemaError, "49152 rows", [node(0, "call_module", {"$tensor": "c0"}, path="model.embed_tokens")]),
}
PLAN_FIELDS = {
    "schema true": (SchemaError, "schema", {"schema": True}),
    "model not a string": (SchemaError, "model", {"model": ["tiny-llama"]}),
    "mode unknown": (SchemaError, "mode", {"mode": "exec"}),
    "invoke kind unknown": (SchemaError, "kind", {"invokes": [{"kind": "code", "tensors": ["in0"]}]}),
    "invoke without rows": (SchemaError, "no rows", {"invokes": [{"kind": "tokens", "tensors": []}]}),
    "invoke of a missing tensor": (SchemaError, "does not carry", {"invokes": [{"kind": "tokens", "tensors": ["zz"]}]}),
    "no invokes": (SchemaError, "no inputs", {"invokes": []}),
    "nodes not a list": (SchemaError, "nodes", {"nodes": {"0": 1}}),
    "generate not an object": (SchemaError, "generation options", {"mode": "generate", "generate": [3]}),
    "generate unknown option": (SchemaError, "unknown generation options", {"mode": "generate", "generate": {"max_new_tokens": 1, "eval": 1}}),
    "max_new_tokens as text": (SchemaError, "max_new_tokens", {"mode": "generate", "generate": {"max_new_tokens": "5"}}),
    "max_new_tokens 2**70": (SchemaError, "max_new_tokens", {"mode": "generate", "generate": {"max_new_tokens": HUGE}}),
    "max_new_tokens 10**9": (LimitError, "max_new_tokens", {"mode": "generate", "generate": {"max_new_tokens": 10**9}}),
    "max_new_tokens 0": (SchemaError, "max_new_tokens", {"mode": "generate", "generate": {"max_new_tokens": 0}}),
    "do_sample as text": (SchemaError, "do_sample", {"mode": "generate", "generate": {"max_new_tokens": 1, "do_sample": "yes"}}),
    "temperature 0": (SchemaError, "temperature", {"mode": "generate", "generate": {"max_new_tokens": 1, "do_sample": True, "temperature": 0}}),
    "stop strings not strings": (SchemaError, "stop", {"mode": "generate", "generate": {"max_new_tokens": 1, "stop": [1, {"$ref": 0}]}}),
    "eos ids not integers": (SchemaError, "eos_token_id", {"mode": "generate", "generate": {"max_new_tokens": 1, "eos_token_id": [1.5]}}),
    "repetition penalty nan": (SchemaError, "repetition_penalty", {"mode": "generate", "generate": {"max_new_tokens": 1, "repetition_penalty": {"$float": "nan"}}}),
    "temperature NaN": (SchemaError, "temperature", {"mode": "generate", "generate": {"max_new_tokens": 1, "temperature": math.nan}}),
    "top_p 5": (SchemaError, "top_p", {"mode": "generate", "generate": {"max_new_tokens": 1, "top_p": 5}}),
    "top_k negative": (SchemaError, "top_k", {"mode": "generate", "generate": {"max_new_tokens": 1, "top_k": -3}}),
    "seed negative": (SchemaError, "seed", {"mode": "generate", "generate": {"max_new_tokens": 1, "seed": -1}}),
    "seed 2**70": (SchemaError, "seed", {"mode": "generate", "generate": {"max_new_tokens": 1, "seed": HUGE}}),
}
TENSORS = {
    "negative token id": (SchemaError, "token id -1 at position 1 is outside the vocabulary", {"in0": torch.tensor([5, -1, 7])}),
    "token id past the vocabulary": (SchemaError, f"token id {VOCAB} at position 0", {"in0": torch.tensor([VOCAB, 1])}),
    "token id 2**62": (SchemaError, "outside the vocabulary", {"in0": torch.tensor([2**62])}),
    "float token ids": (SchemaError, "integer", {"in0": torch.tensor([1.0, 2.0])}),
    "token ids of two dims": (SchemaError, "1-D", {"in0": torch.ones(2, 2, dtype=torch.long)}),
}


def _case(name):
    if name in HOSTILE:
        error, match, nodes = HOSTILE[name]
        if isinstance(nodes, bytes):
            return error, match, nodes
        return error, match, blob(nodes, {"in0": IDS, "c0": torch.tensor([5, VOCAB + 10])})
    if name in PLAN_FIELDS:
        error, match, fields = PLAN_FIELDS[name]
        return error, match, blob(**fields)
    error, match, tensors = TENSORS[name]
    return error, match, blob([], tensors)


def decode_and_validate(data: bytes, host) -> None:
    plan = decode_plan(data)
    validate.validate(plan, host.info, limits=validate.Limits(), meta_module=host._meta.get)


@pytest.mark.parametrize("name", [*HOSTILE, *PLAN_FIELDS, *TENSORS])
def test_hostile_plan_gets_its_named_error(host, model, name):
    error, match, data = _case(name)
    with pytest.raises(error, match=match) as err:
        decode_and_validate(data, host)
    assert not str(err.value).startswith((validate.UNEXPECTED, codec.UNEXPECTED)), err.value
    with pytest.raises((PlanError, ExecutionError)):  # the engine's own answer is a named error
        model.lab.run(MODEL, data)


def test_engine_serves_on_after_the_corpus(model):
    for name in [*HOSTILE, *PLAN_FIELDS, *TENSORS]:
        with pytest.raises((PlanError, ExecutionError)):
            model.lab.run(MODEL, _case(name)[2])
    with model.trace("The Eiffel Tower is in"):
        top = model.output.logits[:, -1].argmax(-1).save()
    assert top.value.shape == (1,)


# -- the property test ------------------------------------------------------------------------------
# Plans of the right rough shape, mostly plausible so that they get deep into validation
# (shapes on meta tensors, limits), with hostile values mixed in at every level.
HOSTILE_LEAVES = st.sampled_from([
    2**31, 2**62, 2**63 - 1, 2**63, -(2**63) - 1, HUGE, -1, 1e308, -math.inf, math.nan,
    "__class__", "_x", "cuda", "meta", "%d", "", {"$ref": -1}, {"$ref": 99}, {"$tensor": "nope"},
    {"$tensor": 3}, {"$dtype": "float128"}, {"$dtype": 3}, {"$float": "x"}, {"$eval": 1},
    {"$record": ["x", {}]}, {"$ref": 0, "$tensor": "c0"}])
PLAIN_LEAVES = st.sampled_from([
    0, 1, 2, 3, -1, -2, 64, 0.5, 2.0, True, False, None, math.inf, "logits", "T", "values",
    "shape", "...", "bi,bi->b", {"$tensor": "c0"}, {"$tensor": "in0"}, {"$dtype": "float32"},
    {"$dtype": "int64"}, {"$dtype": "bool"}, {"$ellipsis": True}, {"$float": "-inf"}])
OP_NAMES = sorted(OPS)
PATHS = ["", "model", "model.layers.0", "model.layers.3.mlp", "model.layers.1.self_attn",
         "model.norm", "lm_head", "model.embed_tokens", "model.layers.0.mlp.act_fn",
         "model.rotary_emb"]
KWARGS = st.dictionaries(
    st.sampled_from(["dim", "keepdim", "dtype", "device", "out", "inplace", "__globals__", "k",
                     "x", "pin_memory", "num_classes"]),
    PLAIN_LEAVES | HOSTILE_LEAVES, max_size=2)


def values(earlier: int):
    """Argument values of a node that may read nodes ``0..earlier-1``."""
    refs = st.integers(0, max(earlier - 1, 0)).map(lambda i: {"$ref": i}) if earlier \
        else PLAIN_LEAVES
    leaf = st.integers(0, 15).flatmap(
        lambda k: refs if k < 8 else PLAIN_LEAVES if k < 15 else HOSTILE_LEAVES)
    one = st.integers(0, 9).flatmap(
        lambda k: leaf if k < 6 else st.lists(leaf, max_size=3) if k < 7
        else st.lists(leaf, min_size=3, max_size=3).map(lambda v: {"$slice": v}) if k < 8
        else st.lists(leaf, max_size=3).map(lambda v: {"$tuple": v}))
    return st.integers(0, 9).flatmap(
        lambda k: one if k else st.lists(one, max_size=2).map(lambda v: {"$tuple": v}))


@st.composite
def nodes(draw):
    out = []
    for i in range(draw(st.integers(1, 7))):
        kind = draw(st.integers(0, 19))
        if kind < 5:
            n = {"id": i, "op": "point", "path": draw(st.sampled_from(PATHS)),
                 "io": draw(st.sampled_from(["output", "output", "output", "input"])),
                 "invoke": draw(st.sampled_from([0, 0, 0, 0, None, 1]))}
        elif kind < 7:
            n = {"id": i, "op": draw(st.sampled_from(["save", "set_point", "call_module", "param"])),
                 "args": draw(st.lists(values(i), max_size=2)), "path": draw(st.sampled_from(PATHS)),
                 "io": "output"}
        else:
            n = {"id": i, "op": draw(st.sampled_from(OP_NAMES)),
                 "args": draw(st.lists(values(i), max_size=4))}
            if draw(st.integers(0, 3)) == 0:
                n["kwargs"] = draw(KWARGS)
        if draw(st.integers(0, 39)) == 0:  # the odd broken node field
            n[draw(st.sampled_from(["id", "steps", "invoke", "path", "op"]))] = draw(
                st.sampled_from([-1, HUGE, "0", True, None, [0, HUGE], [5, 6], "x", 3]))
        out.append(n)
    return out


@st.composite
def plans(draw) -> bytes:
    """A plan blob: mostly a plausible trace or generation of tiny-llama, at times not."""
    embeds = draw(st.integers(0, 4)) == 0
    tensors = {"in0": torch.zeros(3, 64) if embeds else IDS, "c0": torch.tensor([1.0, 2.0])}
    if draw(st.integers(0, 9)) == 0:
        tensors["in0"] = draw(st.sampled_from([
            torch.tensor([-4, 2]), torch.tensor([VOCAB]), torch.zeros(3, 64), IDS,
            torch.tensor([], dtype=torch.long), torch.ones(2, 2, dtype=torch.long)]))
    fields: dict = {"invokes": [{"kind": "embeds" if embeds else "tokens", "tensors": ["in0"]}]}
    if draw(st.booleans()):
        fields["mode"] = "generate"
        fields["generate"] = {"max_new_tokens": draw(st.integers(1, 3))}
        if draw(st.integers(0, 3)) == 0:
            fields["generate"].update(draw(st.dictionaries(st.sampled_from(
                ["max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed",
                 "repetition_penalty", "stop", "eos_token_id", "x"]),
                PLAIN_LEAVES | HOSTILE_LEAVES, max_size=2)))
    return blob(draw(nodes()), tensors, **fields)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=plans())
def test_fuzz_decode_and_validate_answer_with_plan_errors(host, data):
    try:
        decode_and_validate(data, host)
    except PlanError as e:
        assert not str(e).startswith((validate.UNEXPECTED, codec.UNEXPECTED)), repr(e)
