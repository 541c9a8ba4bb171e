"""Plans and results as bytes: JSON for the graph, safetensors for tensors.

One blob is one safetensors file whose metadata holds the JSON document under
``"tpmlab"``. Nothing is ever pickled; decoding refuses anything it does not
know (unknown markers, dtypes, schema versions, over-deep nesting, integers
outside 64 bits, fields of the wrong type), and every refusal is a
:class:`~tpmlab.errors.SchemaError`, whatever the bytes.
"""

from __future__ import annotations

import collections
import functools
import json
import math
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import SchemaError
from .ops import named_fields
from .plan import (
    SCHEMA_VERSION,
    DType,
    EllipsisArg,
    GenerateOptions,
    Invoke,
    Node,
    Plan,
    Ref,
    Slice,
    Steps,
    TensorRef,
    Tuple,
)

MAX_DEPTH = 32
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # plans carry 64-bit integers (what tensor sizes hold)
ALLOWED_DTYPES = {
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in ALLOWED_DTYPES:
        raise SchemaError(f"dtype {name!r} is not allowed; use one of {sorted(ALLOWED_DTYPES)}")
    return getattr(torch, name)


# -- values -------------------------------------------------------------------------------------

def encode_value(value: Any, tensors: dict[str, torch.Tensor] | None = None, depth: int = 0) -> Any:
    """Turn an argument or result value into JSON; tensors go into ``tensors`` by name."""
    if depth > MAX_DEPTH:
        raise SchemaError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, Ref):
        return {"$ref": value.id}
    if isinstance(value, TensorRef):
        return {"$tensor": value.name}
    if isinstance(value, Slice):
        return {"$slice": [encode_value(v, tensors, depth + 1) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, EllipsisArg) or value is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(value, DType):
        return {"$dtype": value.name}
    if isinstance(value, torch.dtype):
        return {"$dtype": dtype_name(value)}
    if isinstance(value, torch.Tensor):
        if tensors is None:
            raise SchemaError("a tensor cannot be encoded here")
        name = f"v{len(tensors)}"
        tensors[name] = value
        return {"$tensor": name}
    if isinstance(value, torch.Size):
        return {"$tuple": list(value)}
    if isinstance(value, Tuple):
        return {"$tuple": [encode_value(v, tensors, depth + 1) for v in value.items]}
    if isinstance(value, tuple):
        fields = named_fields(value)
        if fields:  # named tuples (topk, max) keep their field names
            name = type(value).__name__
            return {"$record": [name, {f: encode_value(getattr(value, f), tensors, depth + 1)
                                       for f in fields}]}
        return {"$tuple": [encode_value(v, tensors, depth + 1) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, tensors, depth + 1) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(f"dict keys must be strings, got {type(k).__name__}")
            out[k] = encode_value(v, tensors, depth + 1)
        return {"$dict": out}
    raise SchemaError(f"cannot encode a value of type {type(value).__name__}")


def decode_value(doc: Any, tensors: dict[str, torch.Tensor] | None, *, as_args: bool,
                 depth: int = 0) -> Any:
    """Inverse of :func:`encode_value`.

    ``as_args=True`` keeps tensor references as :class:`TensorRef` (plan arguments);
    ``False`` substitutes the tensors themselves (results).
    """
    if depth > MAX_DEPTH:
        raise SchemaError(f"value nested deeper than {MAX_DEPTH} levels")
    if isinstance(doc, int) and not isinstance(doc, bool) and not INT_MIN <= doc <= INT_MAX:
        raise SchemaError(f"integer {doc} is outside the 64-bit range")
    if doc is None or isinstance(doc, (bool, int, float, str)):
        return doc
    if isinstance(doc, list):
        return [decode_value(v, tensors, as_args=as_args, depth=depth + 1) for v in doc]
    if not isinstance(doc, dict) or len(doc) != 1:
        raise SchemaError(f"malformed value {str(doc)[:80]!r}")
    (key, body), = doc.items()
    sub = lambda v: decode_value(v, tensors, as_args=as_args, depth=depth + 1)  # noqa: E731
    if key == "$ref":
        if not isinstance(body, int) or isinstance(body, bool):
            raise SchemaError(f"malformed reference {body!r}")
        return Ref(body)
    if key == "$tensor":
        if not isinstance(body, str) or tensors is None or body not in tensors:
            raise SchemaError(f"reference to unknown tensor {body!r}")
        return TensorRef(body) if as_args else tensors[body]
    if key == "$slice":
        if not isinstance(body, list) or len(body) != 3:
            raise SchemaError("a slice needs [start, stop, step]")
        parts = [sub(v) for v in body]
        return Slice(*parts) if as_args else slice(*parts)
    if key == "$tuple":
        if not isinstance(body, list):
            raise SchemaError("malformed tuple")
        items = tuple(sub(v) for v in body)
        return Tuple(items) if as_args else items
    if key == "$ellipsis":
        return EllipsisArg() if as_args else Ellipsis
    if key == "$dtype":
        if not isinstance(body, str):
            raise SchemaError(f"malformed dtype {body!r}")
        dtype_from_name(body)
        return DType(body) if as_args else dtype_from_name(body)
    if key == "$float":
        if not isinstance(body, str) or body not in ("inf", "-inf", "nan"):
            raise SchemaError(f"malformed float {body!r}")
        return float(body)
    if key == "$dict":
        if not isinstance(body, dict):
            raise SchemaError("malformed dict")
        return {str(k): sub(v) for k, v in body.items()}
    if key == "$record" and not as_args:
        if (not isinstance(body, list) or len(body) != 2 or not isinstance(body[1], dict)
                or not all(isinstance(k, str) and k.isidentifier() and not k.startswith("_")
                           for k in body[1])):
            raise SchemaError("malformed record")
        return _record_type(str(body[0]), tuple(body[1]))(*(sub(v) for v in body[1].values()))
    raise SchemaError(f"unknown value marker {key!r}")


@functools.lru_cache(maxsize=64)
def _record_type(name: str, fields: tuple[str, ...]) -> type:
    """A named tuple like the one saved (``topk`` -> ``.values``, ``.indices``, or unpacking)."""
    safe = name if name.isidentifier() and not name.startswith("_") else "record"
    return collections.namedtuple(safe, fields)


# -- plans --------------------------------------------------------------------------------------

_ONE_STEP = Steps()  # a trace's nodes: the field is left out


def plan_to_doc(plan: Plan) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = dict(plan.tensors)
    nodes = []
    for n in plan.nodes:
        d: dict[str, Any] = {"id": n.id, "op": n.op}
        args = n.args
        if args:
            if len(args) == 1 and type(args[0]) is Ref:  # most nodes: one value (save, grad)
                d["args"] = [{"$ref": args[0].id}]
            else:
                d["args"] = encode_value(list(args), tensors)
        if n.kwargs:
            d["kwargs"] = encode_value(dict(n.kwargs), tensors)["$dict"]
        if n.path is not None:
            d["path"] = n.path
        if n.io is not None:
            d["io"] = n.io
        if n.invoke is not None:
            d["invoke"] = n.invoke
        if n.line is not None:
            d["line"] = n.line
        if n.steps != _ONE_STEP:
            d["steps"] = [n.steps.start, n.steps.stop]
        nodes.append(d)
    doc = {
        "schema": plan.schema,
        "model": plan.model,
        "model_version": plan.model_version,
        "mode": plan.mode,
        "invokes": [{"kind": i.kind, "tensors": list(i.tensors)} for i in plan.invokes],
        "nodes": nodes,
    }
    if plan.generate is not None:
        doc["generate"] = {k: v for k, v in vars(plan.generate).items() if v is not None}
    if plan.stop:  # absent when false: plans without it keep their digests
        doc["stop"] = True
    return doc, tensors


def encode_plan(plan: Plan) -> bytes:
    doc, tensors = plan_to_doc(plan)
    return _pack(doc, tensors)


def decode_plan(blob: bytes, *, max_bytes: int | None = None) -> Plan:
    """Parse a plan blob. Raises :class:`SchemaError` on anything malformed."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise SchemaError(f"plan of {len(blob)} bytes exceeds the limit of {max_bytes} bytes")
    doc, tensors = _unpack(blob)
    return plan_from_doc(doc, tensors)


def plan_from_doc(doc: Any, tensors: dict[str, torch.Tensor]) -> Plan:
    try:
        return _plan_from_doc(doc, tensors)
    except SchemaError:
        raise
    except Exception as e:  # the boundary: whatever the document holds, a SchemaError
        raise SchemaError(f"{UNEXPECTED}: {type(e).__name__}: {str(e)[:200]}") from None


UNEXPECTED = "the plan document could not be decoded (an unexpected failure of the decoder)"


def _plan_from_doc(doc: Any, tensors: dict[str, torch.Tensor]) -> Plan:
    if not isinstance(doc, dict):
        raise SchemaError("a plan must be a JSON object")
    schema = doc.get("schema")
    if not _is_int(schema) or schema != SCHEMA_VERSION:
        raise SchemaError(f"plan schema version {schema!r} is not supported (this engine speaks {SCHEMA_VERSION})")
    try:
        nodes = [_node_from_doc(d, tensors) for d in _list(doc, "nodes")]
        invokes = []
        for d in _list(doc, "invokes"):
            kind = d.get("kind")
            if kind not in ("tokens", "embeds"):
                raise SchemaError(f"invoke kind {kind!r} is not 'tokens' or 'embeds'")
            names = d.get("tensors")
            if not isinstance(names, list) or not all(isinstance(t, str) and t in tensors for t in names):
                raise SchemaError("an invoke names tensors the plan does not carry")
            invokes.append(Invoke(kind, names))
        gen = doc.get("generate")
        options = None
        if gen is not None:
            options = _generate_options(gen)
        mode = doc.get("mode", "trace")
        if mode not in ("trace", "generate"):
            raise SchemaError(f"plan mode {str(mode)[:40]!r} is not 'trace' or 'generate'")
        for key in ("model", "model_version"):
            if not isinstance(doc.get(key, ""), str):
                raise SchemaError(f"plan field {key!r} must be a string")
        stop = doc.get("stop", False)
        if not isinstance(stop, bool):
            raise SchemaError("plan field 'stop' must be true or false")
        return Plan(model=doc.get("model", ""), model_version=doc.get("model_version", ""),
                    invokes=invokes, nodes=nodes, tensors=tensors, mode=mode, generate=options,
                    schema=schema, stop=stop)
    except (TypeError, ValueError, AttributeError) as e:
        raise SchemaError(f"malformed plan: {e}") from None


_GENERATE_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "do_sample": (bool,), "temperature": (int, float),
    "top_k": (int,), "top_p": (int, float), "seed": (int,), "repetition_penalty": (int, float),
    "stop": (list,), "eos_token_id": (list,)}


def _generate_options(gen: Any) -> GenerateOptions:
    if not isinstance(gen, dict):
        raise SchemaError("generation options must be a JSON object")
    unknown = set(gen) - set(_GENERATE_TYPES)
    if unknown:
        raise SchemaError(f"unknown generation options {sorted(unknown)}")
    for key, value in gen.items():
        types = _GENERATE_TYPES[key]
        nullable = key not in ("max_new_tokens", "do_sample")
        if key == "stop" and isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise SchemaError("generation option stop must be a list of strings")
        if key == "eos_token_id" and isinstance(value, list) and not all(_is_int(v) for v in value):
            raise SchemaError("generation option eos_token_id must be a list of integers")
        if (value is None and nullable) or (
                isinstance(value, types) and (bool in types or not isinstance(value, bool))
                and not (isinstance(value, int) and not INT_MIN <= value <= INT_MAX)):
            continue
        raise SchemaError(f"generation option {key}={repr(value)[:40]} must be "
                          f"{' or '.join(t.__name__ for t in types)}")
    return GenerateOptions(**gen)


def _list(doc: dict, key: str) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise SchemaError(f"plan field {key!r} must be a list")
    return value


def _node_from_doc(d: Any, tensors: dict[str, torch.Tensor]) -> Node:
    if not isinstance(d, dict):
        raise SchemaError("a node must be a JSON object")
    unknown = set(d) - {"id", "op", "args", "kwargs", "path", "io", "invoke", "line", "steps"}
    if unknown:
        raise SchemaError(f"node has unknown fields {sorted(unknown)}")
    node_id, op = d.get("id"), d.get("op")
    if not _is_int(node_id) or not isinstance(op, str):
        raise SchemaError(f"node needs an integer id and an op name, got {str(d)[:80]!r}")
    args = decode_value(d.get("args", []), tensors, as_args=True)
    kwargs = decode_value({"$dict": d.get("kwargs", {})}, tensors, as_args=True)
    if not isinstance(args, list):
        raise SchemaError("node args must be a list", node=node_id, op=op)
    steps = d.get("steps")
    if steps is None:
        step_spec = Steps()
    else:
        if (not isinstance(steps, list) or len(steps) != 2 or not _is_int(steps[0])
                or not (steps[1] is None or _is_int(steps[1]))):
            raise SchemaError("node steps must be [start, stop|null]", node=node_id, op=op)
        step_spec = Steps(steps[0], steps[1])
    for key in ("path", "io", "line"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise SchemaError(f"node field {key!r} must be a string", node=node_id, op=op)
    invoke = d.get("invoke")
    if invoke is not None and not _is_int(invoke):
        raise SchemaError("node invoke must be an integer", node=node_id, op=op)
    return Node(id=node_id, op=op, args=args, kwargs=kwargs, path=d.get("path"), io=d.get("io"),
                invoke=invoke, steps=step_spec, line=d.get("line"))


def _is_int(value: Any) -> bool:
    """A JSON integer (not a bool) in the 64-bit range."""
    return isinstance(value, int) and not isinstance(value, bool) and INT_MIN <= value <= INT_MAX


# -- results ------------------------------------------------------------------------------------

def encode_result(values: dict[int, Any], meta: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    doc = {"meta": meta, "values": {str(k): encode_value(v, tensors) for k, v in values.items()}}
    return _pack(doc, tensors)


def decode_result(blob: bytes) -> tuple[dict[int, Any], dict[str, Any]]:
    doc, tensors = _unpack(blob)
    values = {int(k): decode_value(v, tensors, as_args=False) for k, v in doc["values"].items()}
    meta = doc["meta"]
    if isinstance(meta.get("node_seconds"), dict):  # node ids, which JSON made strings
        meta["node_seconds"] = {int(k): v for k, v in meta["node_seconds"].items()}
    return values, meta


# -- framing ------------------------------------------------------------------------------------

def _pack(doc: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    flat = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}  # no shared memory
    return st_save(flat, metadata={"tpmlab": json.dumps(doc, separators=(",", ":"), allow_nan=False)})


def _unpack(blob: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SchemaError("a plan must be bytes")
    blob = bytes(blob)
    if len(blob) < 8:
        raise SchemaError("payload too short to be a tpmlab plan")
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > len(blob) - 8:
        raise SchemaError("payload header is larger than the payload")
    try:
        header = json.loads(blob[8:8 + header_len])
        meta = header.get("__metadata__") or {}
        doc = json.loads(meta["tpmlab"])
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype", "").lower() not in _ST_DTYPES:
                raise SchemaError(f"tensor {name!r} has a dtype that is not allowed: {info.get('dtype')}")
        tensors = st_load(blob) if len(header) > 1 else {}
    except SchemaError:
        raise
    except Exception as e:  # any parse failure is a malformed payload, never a crash
        raise SchemaError(f"payload is not a tpmlab plan or result: {type(e).__name__}: {e}") from None
    return doc, tensors


_ST_DTYPES = {"f32", "f16", "bf16", "f64", "i64", "i32", "i16", "i8", "u8", "bool"}
