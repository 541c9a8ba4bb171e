"""Random plans of several users for property tests of row isolation (DESIGN.md contract 9),
written directly in the plan IR so they reach every event of a model, input and output,
and every tensor inside a tuple or model-output value.

Each user's plan has one or two invokes (prompts of random lengths, so merged batches are
padded) and a few actions at random events: saves, reads, writes (``setitem``, in-place
ops, ``set_point``), then saves its own logits. :func:`check_merged_runs` runs the plans
merged and checks each user's part.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tpmlab.ir.codec import encode_plan
from tpmlab.ir.merge import merge_plans, split_values
from tpmlab.ir.model_info import ModelInfo
from tpmlab.ir.plan import EllipsisArg, Invoke, Node, Plan, Ref, Slice, Tuple
from tpmlab.ir.rows import tensor_parts

# TPMLAB_PROPERTY_SCALE=10 runs ten times the examples, drawn afresh each run; by default
# (CI) a fixed, small set, so the suite's time and outcome do not vary between runs.
SCALE = float(os.environ.get("TPMLAB_PROPERTY_SCALE", "1"))


def property_settings(examples: int) -> settings:
    """Hypothesis settings for ``examples`` examples (times the scale), without deadlines:
    a forward pass on a loaded machine has no bounded time."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None,
                    derandomize=SCALE <= 1,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


ACTIONS = ("save", "save_whole", "read", "setitem", "iadd", "mul_", "fill_", "set_point")
FLOATS = (-1.5, -0.5, 0.25, 0.5, 2.0)


class _Builder:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.nodes: list[Node] = []

    def add(self, op: str, args: list | None = None, **fields: Any) -> Ref:
        node = Node(id=len(self.nodes), op=op, args=args or [], **fields)
        self.nodes.append(node)
        return Ref(node.id)


def _writable_parts(template: Any) -> list[tuple[tuple, list, str]]:
    """(path, dims, dtype) of the tensors of an event value that belong to the rows."""
    out = []
    for path, dims in tensor_parts(template):
        if "B" in dims:
            node = template
            for k in path:
                node = node["$tuple"][k] if "$tuple" in node else node["$dict"][k]
            out.append((path, dims, node.get("dtype", "float32")))
    return out


@st.composite
def user_plan(draw: Any, info: ModelInfo, *, max_actions: int = 4) -> Plan:
    """One user's trace of ``info``'s model."""
    b = _Builder(info)
    tensors: dict[str, torch.Tensor] = {}
    invokes = []
    for i in range(draw(st.integers(1, 2))):
        names = []
        for r in range(draw(st.integers(1, 2))):
            length = draw(st.integers(1, 6))
            name = f"in{i}.{r}"
            tensors[name] = torch.tensor(draw(st.lists(st.integers(1, 999), min_size=length,
                                                       max_size=length)))
            names.append(name)
        invokes.append(Invoke("tokens", names))
    usable = [(k, e) for k, e in enumerate(info.events) if _writable_parts(info.shapes.get(e))]
    for _ in range(draw(st.integers(1, max_actions))):
        _, event = draw(st.sampled_from(usable))
        path, io = event.rsplit(":", 1)
        invoke = draw(st.integers(0, len(invokes) - 1))
        point = b.add("point", path=path, io=io, invoke=invoke)
        part, dims, dtype = draw(st.sampled_from(_writable_parts(info.shapes[event])))
        x = point
        for key in part:
            x = b.add("getattr" if isinstance(key, str) else "getitem", [x, key])
        action = draw(st.sampled_from(ACTIONS))
        is_int = not dtype.startswith(("float", "bfloat"))
        value = draw(st.integers(0, 3)) if is_int else draw(st.sampled_from(FLOATS))
        index = (Tuple((Slice(), -1)) if len(dims) >= 2 and draw(st.booleans())
                 else EllipsisArg())
        if action == "save":
            b.add("save", [x])
        elif action == "save_whole":
            b.add("save", [point])
        elif action == "read":
            b.add("save", [b.add("add", [x, value])])
        elif action == "setitem":
            b.add("setitem", [x, index, value])
            b.add("save", [x])
        elif action == "iadd":
            b.add("iadd", [x, value])
        elif action == "mul_":
            b.add("mul_", [x, value if not is_int else 1 + value % 2])
        elif action == "fill_":  # an in-place op the op table does not flag as a write
            b.add("fill_", [x, value])
        elif action == "set_point" and not part:
            b.add("set_point", [point, b.add("add", [x, value])], path=path, io=io)
            b.add("save", [b.add("point", path=path, io=io, invoke=invoke)])
        else:
            b.add("save", [x])
    for i in range(len(invokes)):  # every user reads its own logits, after all writes
        out = b.add("point", path="", io="output", invoke=i)
        logits = b.add("getattr", [out, "logits"])
        b.add("save", [b.add("getitem", [logits, Tuple((EllipsisArg(), Slice(0, 256)))])])
    return Plan(model=info.name, model_version=info.version, invokes=invokes, nodes=b.nodes,
                tensors=tensors)


def users(info: ModelInfo, *, max_actions: int = 4) -> st.SearchStrategy[list[Plan]]:
    """Two to four users' plans."""
    return st.lists(user_plan(info, max_actions=max_actions), min_size=2, max_size=4)


def assert_same(a: Any, b: Any, *, exact: bool, where: str) -> None:
    """Equal structure; tensors equal bit for bit (``exact``) or to float rounding."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.shape == b.shape and a.dtype == b.dtype, (where, a.shape, b.shape)
        if torch.equal(a, b):
            return
        if exact or not a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], exact=exact, where=f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, exact=exact, where=f"{where}[{i}]")
    else:
        assert a == b, where


def check_merged_runs(run_values: Any, plans: list[Plan]) -> None:
    """Run ``plans`` merged; for each user, its part must be

    * bit for bit its result in the same batch when the other users' plans do nothing
      (nothing another user does reaches its rows), and
    * its solo result to float rounding (the batch's shape changes the kernels' summation
      order, never the values' meaning).

    ``run_values(plan_bytes)`` runs a plan on the engine under test.
    """
    merged, mapping = merge_plans(plans)
    parts = split_values(run_values(encode_plan(merged))[0], mapping)
    idle = [p.replace(nodes=[]) for p in plans]
    for k, plan in enumerate(plans):
        same_batch, ref_map = merge_plans([p if j == k else idle[j] for j, p in enumerate(plans)])
        reference = split_values(run_values(encode_plan(same_batch))[0], ref_map)[k]
        solo = run_values(encode_plan(plan))[0]
        assert set(parts[k]) == set(reference) == set(solo)
        for node, value in parts[k].items():
            where = f"user {k} node {node} ({plan.node(node).describe()})"
            assert_same(value, reference[node], exact=True, where=where + " vs same batch")
            assert_same(value, solo[node], exact=False, where=where + " vs solo")


@contextlib.contextmanager
def recording(model: Any, tracer: Any):
    """Record ``tracer``'s plan (a ``model.trace(...)`` or ``model.generate(...)``) without
    running it: ``with recording(m, m.trace("hi")) as tr: ...`` then ``tr.plan()``."""
    with tracer.recording():
        yield tracer
