"""Every deliberate error is a TpmlabError that states its HTTP status, and an error raised
on the gateway's side arrives in the client as the same class."""

from __future__ import annotations

import httpx
import pytest

from tpmlab.cluster.errors import StageLostError
from tpmlab.errors import ExecutionError, PlanError, TpmlabError
from tpmlab.gateway import errors as gw
from tpmlab.gateway.client import GatewayBackend, raise_for_error
from tpmlab.gateway.ledger import LedgerError
from tpmlab.models import ModelNotFoundError, UnsupportedArchitectureError
from tpmlab.store import StoreError

from .conftest import MODEL


def every_error_class() -> dict[str, type[TpmlabError]]:
    import tpmlab.lenses  # noqa: F401 - its errors, too
    import tpmlab.tracing.proxy  # noqa: F401

    return gw.error_classes()


def test_the_named_errors_are_tpmlab_errors():
    for cls in (StoreError, LedgerError, ModelNotFoundError, UnsupportedArchitectureError):
        assert issubclass(cls, TpmlabError), cls
    assert isinstance(ModelNotFoundError("x"), KeyError)  # still what mapping users catch
    assert isinstance(UnsupportedArchitectureError("x"), ValueError)


def test_every_tpmlab_error_class_has_a_status_and_a_unique_name():
    classes = every_error_class()
    assert len(classes) >= 40
    for name, cls in classes.items():
        assert isinstance(cls.http_status, int) and 400 <= cls.http_status < 600, name
        assert gw.http_status(cls.__new__(cls)) == cls.http_status
    names = [c.__name__ for c in gw._subclasses(TpmlabError) if gw._public(c)]
    assert len(names) == len(set(names)), "two error classes share a name"
    assert {ModelNotFoundError.http_status, LedgerError.http_status} == {404, 400}
    # a lost worker is the service's failure, retried with success once healed: not the plan's
    assert StageLostError.http_status == 503 and issubclass(StageLostError, ExecutionError)


def test_every_error_class_comes_back_from_its_answer_as_itself():
    for name, cls in every_error_class().items():
        if issubclass(cls, (PlanError, ExecutionError)):
            error = cls("went wrong", node=3, line="cell:2")
        else:
            error = cls("went wrong")
        response = httpx.Response(gw.http_status(error), json=gw.error_body(error))
        with pytest.raises(cls) as caught:
            raise_for_error(response)
        assert type(caught.value) is cls, name
        assert "went wrong" in str(caught.value) and caught.value.http_status == cls.http_status
        if isinstance(error, (PlanError, ExecutionError)):
            assert (caught.value.node, caught.value.line) == (3, "cell:2")


def test_an_answer_that_names_no_class_is_read_by_its_status():
    """A proxy in front of the gateway answers without our body: its status picks the class."""
    for cls in (gw.AuthenticationError, gw.QuotaError, gw.TierError, gw.NotFoundError,
                gw.ResultGoneError, gw.PayloadTooLargeError, gw.RateLimitError,
                gw.UpstreamError, gw.GatewayTimeoutError, gw.BadRequestError):
        with pytest.raises(cls):
            raise_for_error(httpx.Response(cls.http_status, text="<html>refused</html>"))
    with pytest.raises(gw.GatewayError) as caught:
        raise_for_error(httpx.Response(418, text="teapot"))
    assert type(caught.value) is gw.GatewayError and "HTTP 418" in str(caught.value)


def test_errors_raised_by_a_running_gateway_arrive_as_the_same_class(served):
    backend = GatewayBackend(served.url, served.keys["admin"])
    try:
        with pytest.raises(gw.NotFoundError):
            backend.deploy("no-such-model")
        with pytest.raises(PlanError) as caught:  # the engine's own validation
            backend.run(MODEL, b"not a plan")
        assert type(caught.value).__name__ == "SchemaError"
        with pytest.raises(LedgerError, match="exists"):  # the ledger's, through the admin API
            raise_for_error(backend.http.post("/v1/admin/users",
                                              json={"name": "query-user", "tier": "query"}))
        with pytest.raises(gw.MethodNotAllowedError):  # routing answers name classes too
            raise_for_error(backend.http.delete("/v1/me"))
    finally:
        backend.close()
