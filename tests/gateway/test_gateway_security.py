"""Hostile input: refused with 4xx, and the service goes on; the decoder under fuzzing."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from tpmlab.errors import SchemaError
from tpmlab.ir.codec import decode_plan, encode_plan
from tpmlab.ir.plan import Plan

from .conftest import MODEL, raw_request


def _blob(doc, tensors=None):
    return st_save(tensors or {}, metadata={"tpmlab": json.dumps(doc)})


def _doc(nodes, **kw):
    return {"schema": 1, "model": MODEL, "model_version": "", "mode": "trace",
            "invokes": [{"kind": "tokens", "tensors": ["in0"]}], "nodes": nodes, **kw}


IDS = {"in0": torch.tensor([1, 2, 3])}


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _deep(n):
    v = {"$ref": 0}
    for _ in range(n):
        v = [v]
    return v


HOSTILE = {
    "pickle": pickle.dumps(Evil()),
    "torch.save pickle": b"PK\x03\x04" + pickle.dumps({"a": 1}),
    "random bytes": bytes(range(256)) * 4,
    "empty-ish": b"\x00" * 8,
    "huge header length": (2**60).to_bytes(8, "little") + b"{}",
    "unknown op": _blob(_doc([{"id": 0, "op": "point", "path": "", "io": "output", "invoke": 0},
                              {"id": 1, "op": "system", "args": [{"$ref": 0}]}]), IDS),
    "eval op": _blob(_doc([{"id": 0, "op": "__import__", "args": ["os"]}]), IDS),
    "dunder getattr": _blob(_doc([
        {"id": 0, "op": "point", "path": "", "io": "output", "invoke": 0},
        {"id": 1, "op": "getattr", "args": [{"$ref": 0}, "__class__"]},
        {"id": 2, "op": "save", "args": [{"$ref": 1}]}]), IDS),
    "path traversal": _blob(_doc([
        {"id": 0, "op": "point", "path": "../../etc/passwd", "io": "output", "invoke": 0},
        {"id": 1, "op": "save", "args": [{"$ref": 0}]}]), IDS),
    "dunder path": _blob(_doc([
        {"id": 0, "op": "point", "path": "model.__class__.__init__", "io": "output", "invoke": 0},
        {"id": 1, "op": "save", "args": [{"$ref": 0}]}]), IDS),
    "dunder kwarg": _blob(_doc([
        {"id": 0, "op": "point", "path": "", "io": "output", "invoke": 0},
        {"id": 1, "op": "sum", "args": [{"$ref": 0}], "kwargs": {"__globals__": 1}}]), IDS),
    "deep nesting": _blob(_doc([{"id": 0, "op": "point", "path": "", "io": "output",
                                 "invoke": 0},
                                {"id": 1, "op": "make_list", "args": _deep(200)}]), IDS),
    "huge shape": _blob(_doc([{"id": 0, "op": "zeros", "args": [10**6, 10**6]},
                              {"id": 1, "op": "save", "args": [{"$ref": 0}]}]), IDS),
    "huge expand": _blob(_doc([
        {"id": 0, "op": "point", "path": "model.layers.0", "io": "output", "invoke": 0},
        {"id": 1, "op": "expand", "args": [{"$ref": 0}, 10**5, 10**5, 64]},
        {"id": 2, "op": "contiguous", "args": [{"$ref": 1}]},
        {"id": 3, "op": "save", "args": [{"$ref": 2}]}]), IDS),
    "many nodes": _blob(_doc([{"id": i, "op": "arange", "args": [3]} for i in range(30_000)]),
                        IDS),
    "forward reference": _blob(_doc([{"id": 0, "op": "save", "args": [{"$ref": 5}]}]), IDS),
    "bad dtype tensor": st_save({"in0": torch.tensor([1.0 + 2j])},
                                metadata={"tpmlab": json.dumps(_doc([]))}),
    "wrong model": _blob({**_doc([]), "model": "other"}, IDS),
    "future schema": _blob({**_doc([]), "schema": 99}, IDS),
    "generation bomb": _blob({**_doc([]), "mode": "generate",
                              "generate": {"max_new_tokens": 10**9}}, IDS),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_payload_refused_and_service_unharmed(served, lab_model, name, capsys):
    with served.client("intervene") as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=HOSTILE[name])
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        body = r.json()
        assert body["error"] and body["message"]
        assert "pwned" not in capsys.readouterr().out
        # a following good request works
        ok = c.post(f"/v1/models/{MODEL}/run", content=_good_blob(lab_model))
        assert ok.status_code == 200


def _good_blob(model):
    tr = model.trace("hello")
    with tr.recording():
        model.output.logits[:, -1].save()
    return encode_plan(tr.plan())


def test_oversized_body_refused_before_reading_it_all(served):
    limit = served.gateway.config.tier_limits["query"].max_plan_bytes
    # a declared length over the tier's limit is refused with only 1 MiB of it sent
    answer = raw_request(served.url, f"POST /v1/models/{MODEL}/run HTTP/1.1",
                         {"Authorization": f"Bearer {served.keys['query']}",
                          "Content-Length": str(limit + 1)}, b"\x00" * 2**20)
    assert answer.startswith(b"HTTP/1.1 413") and b"PayloadTooLargeError" in answer
    with served.client("admin") as c:
        assert c.post(f"/v1/models/{MODEL}/run", content=b"").status_code == 400
        assert c.post("/v1/models/../../etc/run", content=b"x").status_code == 404
        assert c.post("/v1/models/no-such-model/run", content=b"x").status_code == 404


def test_tier_limits_apply(served, lab_model):
    """The query tier may send fewer invokes than the engine allows (its Limits)."""
    tr = lab_model.trace()
    for _ in range(served.gateway.config.tier_limits["query"].max_invokes + 1):
        with tr.invoke("hello"):
            pass
    blob = encode_plan(tr.plan())
    with served.client("query") as c:
        r = c.post(f"/v1/models/{MODEL}/run", content=blob)
    assert r.status_code == 413 and r.json()["error"] == "LimitError", r.text
    with served.client("inspect") as c:
        assert c.post(f"/v1/models/{MODEL}/run", content=blob).status_code == 200


# -- fuzzing the decoder ---------------------------------------------------------------------------
def _check_decode(blob: bytes) -> None:
    try:
        plan = decode_plan(blob)
    except SchemaError:
        return
    assert isinstance(plan, Plan)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["$ref", "$tensor", "in0", "point", "save", "output", ""]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["$ref", "$tensor", "$slice", "$tuple", "$dict",
                                       "$dtype", "$float", "$ellipsis", "id", "op", "args",
                                       "kwargs", "path", "io", "invoke", "steps", "x"]),
                      children, max_size=3),
    max_leaves=20)

node_docs = st.fixed_dictionaries(
    {"id": st.integers(-3, 5) | st.text(max_size=2),
     "op": st.sampled_from(["point", "save", "getitem", "add", "set_point", "nope", 3])},
    optional={"args": json_values, "kwargs": json_values, "path": json_values,
              "io": json_values, "invoke": json_values, "steps": json_values,
              "line": json_values})

plan_docs = st.fixed_dictionaries(
    {"schema": st.sampled_from([1, 1, 1, 2, "1", None])},
    optional={"model": json_values, "model_version": json_values,
              "mode": st.sampled_from(["trace", "generate", "x"]) | json_values,
              "invokes": st.lists(st.fixed_dictionaries(
                  {"kind": st.sampled_from(["tokens", "embeds", "x"]),
                   "tensors": st.lists(st.sampled_from(["in0", "zz"]) | json_values,
                                       max_size=2)}), max_size=2) | json_values,
              "nodes": st.lists(node_docs, max_size=5) | json_values,
              "generate": json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(blob):
    _check_decode(blob)
    _check_decode(len(blob).to_bytes(8, "little") + blob)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan_docs)
def test_fuzz_random_plan_documents(doc):
    try:
        meta = json.dumps(doc)
    except (ValueError, OverflowError):
        return
    _check_decode(st_save({"in0": torch.tensor([1, 2])}, metadata={"tpmlab": meta}))
    _check_decode(st_save({}, metadata={"tpmlab": meta}))


# -- hostile HTTP ----------------------------------------------------------------------------------
def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def test_hostile_http_requests_get_4xx_naming_the_problem(served, lab_model):
    """Malformed bodies, headers, lengths and content types: every answer is a 4xx (or the
    connection is refused outright by the HTTP parser), never a 500; the service goes on."""
    key = served.keys["intervene"]
    auth = {"Authorization": f"Bearer {key}"}
    run = f"POST /v1/models/{MODEL}/run HTTP/1.1"
    good = _good_blob(lab_model)
    cases = {
        "length not a number": (run, {**auth, "Content-Length": "abc"}, b"x"),
        "negative length": (run, {**auth, "Content-Length": "-1"}, b"x"),
        "two lengths": (run, {**auth, "Content-Length": "1", "content-length": "2"}, b"xx"),
        "huge declared length": (run, {**auth, "Content-Length": "9" * 30}, b"x"),
        "bad chunk size": (run, {**auth, "Transfer-Encoding": "chunked"}, b"zz\r\nx\r\n0\r\n\r\n"),
        "chunked garbage": (run, {**auth, "Transfer-Encoding": "chunked"},
                            b"5\r\n\x00\x01\x02\x03\x04\r\n0\r\n\r\n"),
        "huge header": (run, {**auth, "X-Pad": "a" * 200_000, "Content-Length": "1"}, b"x"),
        "latin-1 credential": (run, {"Authorization": "Bearer \xff\xfe\xfd",
                                     "Content-Length": "1"}, b"x"),
        "long credential": (run, {"Authorization": "Bearer " + "A" * 6000,
                                  "Content-Length": "1"}, b"x"),
        "empty bearer": (run, {"Authorization": "Bearer ", "Content-Length": "1"}, b"x"),
        "json content type": (run, {**auth, "Content-Type": "application/json",
                                    "Content-Length": str(len(good))}, good),
        "form content type": (run, {**auth, "Content-Type": "multipart/form-data; boundary=x",
                                    "Content-Length": str(len(good))}, good),
        "text content type": (run, {**auth, "Content-Type": "text/plain",
                                    "Content-Length": "4"}, b"plan"),
        "json body": (run, {**auth, "Content-Length": "13"}, b'{"nodes": []}'),
        "gzip body": (run, {**auth, "Content-Encoding": "gzip", "Content-Length": "20"},
                      b"\x1f\x8b" + b"\x00" * 18),
        "timeout nan": (f"POST /v1/models/{MODEL}/run?timeout=nan HTTP/1.1",
                        {**auth, "Content-Length": str(len(good))}, good),
        "timeout negative": (f"POST /v1/models/{MODEL}/run?timeout=-1 HTTP/1.1",
                             {**auth, "Content-Length": str(len(good))}, good),
        "timeout text": (f"POST /v1/models/{MODEL}/run?timeout=soon HTTP/1.1",
                         {**auth, "Content-Length": str(len(good))}, good),
        "nul in model": ("POST /v1/models/%00/run HTTP/1.1", {**auth, "Content-Length": "1"},
                         b"x"),
        "traversal in model": ("POST /v1/models/..%2F..%2Fetc/run HTTP/1.1",
                               {**auth, "Content-Length": "1"}, b"x"),
        "injection in request id": ("GET /v1/requests/'%20OR%201=1-- HTTP/1.1", auth, b""),
        "unknown method": ("BREW /v1/models HTTP/1.1", auth, b""),
        "admin body not json": ("POST /v1/admin/users HTTP/1.1",
                                {"Authorization": f"Bearer {served.keys['admin']}",
                                 "Content-Type": "application/json", "Content-Length": "1"},
                                b"{"),
        "admin units nan": ("POST /v1/admin/users/query-user/allocations HTTP/1.1",
                            {"Authorization": f"Bearer {served.keys['admin']}",
                             "Content-Type": "application/json", "Content-Length": "14"},
                            b'{"units": NaN}'),
        "admin units huge": ("POST /v1/admin/users/query-user/allocations HTTP/1.1",
                             {"Authorization": f"Bearer {served.keys['admin']}",
                              "Content-Type": "application/json", "Content-Length": "16"},
                             b'{"units": 1e300}'),
    }
    for name, (line, headers, body) in cases.items():
        answer = raw_request(served.url, line, headers, body)
        status = _status(answer)
        assert answer == b"" or 400 <= status < 500, (name, answer[:300])
        if b"application/json" in answer.split(b"\r\n\r\n")[0]:
            payload = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert payload.get("error") and payload.get("message"), (name, payload)
    with served.client("intervene") as c:  # the service goes on
        assert c.post(f"/v1/models/{MODEL}/run", content=good).status_code == 200
        assert c.get("/v1/me").json()["balance"] > 0
    assert served.gateway.ledger.audit() == []


def test_failed_authentication_is_throttled_per_address(engine_backend, cost_model, tmp_path):
    """Three failures from 127.0.0.1 and its requests get 429 with Retry-After before any
    credential is checked (a good key too); 127.0.0.2 is not affected."""
    import httpx

    from .conftest import make_gateway, serve

    gw = make_gateway(engine_backend, f"sqlite:///{tmp_path / 'l.db'}", cost_model,
                      auth_failure_burst=3, auth_failure_rate=0.2)
    s = serve(gw)

    def get(key, address="127.0.0.1"):
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(base_url=s.url, transport=transport,
                          headers={"Authorization": f"Bearer {key}"}) as c:
            return c.get("/v1/me")

    try:
        assert [get("tpmk_guess_wrong").status_code for _ in range(3)] == [401] * 3
        r = get("tpmk_guess_wrong")
        assert r.status_code == 429 and r.json()["error"] == "RateLimitError"
        assert 1 <= int(r.headers["retry-after"]) <= 5
        assert get(s.keys["query"]).status_code == 429
        assert get(s.keys["query"], "127.0.0.2").status_code == 200
        assert get("tpmk_guess_wrong", "127.0.0.2").status_code == 401
    finally:
        s.server.stop()


def test_every_error_class_has_one_status_and_comes_back_as_itself():
    """Statuses come from the error classes (plan errors 400, limits 413, run failures 422,
    the gateway's own their status), and the client raises the class the gateway named."""
    import httpx

    from tpmlab import errors as engine
    from tpmlab.gateway import errors as gw
    from tpmlab.gateway.client import raise_for_error

    plan_errors = [c for c in vars(engine).values()
                   if isinstance(c, type) and issubclass(c, engine.PlanError)]
    assert len(plan_errors) >= 7
    for cls in plan_errors:
        assert gw.http_status(cls("x")) == (413 if issubclass(cls, engine.LimitError) else 400)
    assert gw.http_status(engine.ExecutionError("x")) == 422
    assert gw.http_status(engine.WeightsChangedError("x")) == 422
    assert gw.http_status(engine.RequestTimeoutError("x")) == 504
    assert gw.http_status(KeyError("x")) == 500
    gateway_errors = [c for c in vars(gw).values()
                      if isinstance(c, type) and issubclass(c, gw.GatewayError)]
    for cls in plan_errors + gateway_errors + [engine.ExecutionError, engine.WeightsChangedError,
                                               engine.RequestTimeoutError]:
        error = cls("went wrong", node=3, line="cell:2") if issubclass(
            cls, (engine.PlanError, engine.ExecutionError)) else cls("went wrong")
        status = gw.http_status(error)
        assert 400 <= status < 600
        response = httpx.Response(status, json=gw.error_body(error))
        with pytest.raises(cls) as caught:
            raise_for_error(response)
        assert type(caught.value) is cls and "went wrong" in str(caught.value)
        if isinstance(error, engine.PlanError):
            assert caught.value.node == 3 and caught.value.line == "cell:2"
