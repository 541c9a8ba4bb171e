"""Proxies: stand-ins for values inside a ``with model.trace(...)`` block.

Every operation on a proxy records a node in the tracer's plan instead of
computing anything. Python operators, whitelisted tensor methods
(``proxy.softmax(-1)``), ``torch`` functions (``torch.cat([a, b])``), indexing,
item assignment and in-place arithmetic all work; what the whitelist does not
hold is refused on the spot with a message naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import NotSupportedError, TpmlabError
from ..ir import ops as irops
from ..ir.plan import BACKWARD, SAVE
from .unsupported import CONTROL_FLOW, ITERATION, VALUE_ALTERNATIVES

if TYPE_CHECKING:
    from .tracer import Trace


class ValueNotReady(TpmlabError):
    """A saved value was read before its trace ran, or a value that was not saved was read."""


class Proxy:
    """The future value of a plan node."""

    __slots__ = ("_tracer", "_node", "_value", "_has_value")

    def __init__(self, tracer: Trace, node: int) -> None:
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_has_value", False)
        object.__setattr__(self, "_value", None)

    # -- results --------------------------------------------------------------------------------
    def save(self, *, remote: bool = False) -> Proxy:
        """Send this value back: after the ``with`` block, read it as ``.value``.

        ``remote=True``: keep the value (one tensor) on the worker of the stage that made
        it; ``.value`` is then a :class:`tpmlab.remote.RemoteValue` (shape, dtype, a Dask
        future) that the notebook reduces on the workers or writes to Zarr, fetching only
        what it asks for (``tpmlab.remote.concatenate`` builds a ``dask.array`` of many)."""
        return self._tracer.record(SAVE, [self], {"remote": True} if remote else None)

    @property
    def value(self) -> Any:
        """The saved value (a ``torch.Tensor``, or a list of them per generation step)."""
        if not self._has_value:
            node = self._tracer.nodes[self._node]
            if node.op != SAVE:
                raise ValueNotReady("this value was not saved: call .save() on it inside the block")
            raise ValueNotReady("the value is available after the `with` block has run")
        return self._value

    def _set_value(self, value: Any) -> None:
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_has_value", True)

    # -- gradients ------------------------------------------------------------------------------
    def backward(self) -> BackwardBlock:
        """Back-propagate this scalar after the forward pass (one per trace). Read gradients
        after it, as ``model.layers[3].output.grad``; ``with loss.backward():`` also reads well."""
        self._tracer.record(BACKWARD, [self])
        return BackwardBlock()

    @property
    def grad(self) -> Proxy:
        """The gradient of the backward's loss with respect to this module value (or
        parameter, from ``.param(name)``), of the same shape. Save it, compute with it, or
        write it (``h.grad[:, 0] = 0``, ``h.grad = h.grad * 2``): a written gradient is what
        flows on to earlier layers."""
        return self._tracer.grad_of(self)

    # -- recording ------------------------------------------------------------------------------
    def _op(self, name: str, *args: Any, **kwargs: Any) -> Proxy:
        return _recorder(self._tracer).record(name, list(args), kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in VALUE_ALTERNATIVES:
            raise NotSupportedError(VALUE_ALTERNATIVES[name])
        if name in irops.METHOD_OPS:
            def method(*args: Any, **kwargs: Any) -> Proxy:
                return self._op(name, self, *args, **kwargs)
            method.__name__ = name
            return method
        return self._op("getattr", self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":  # written in place: what flows on is the new value
            grad = self._tracer.grad_of(self)
            if value is not grad:
                grad._op("setitem", grad, Ellipsis, value)
            return
        raise TpmlabError(f"cannot set attribute {name!r} of a traced value")

    def __getitem__(self, index: Any) -> Proxy:
        return self._op("getitem", self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._op("setitem", self, index, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        node = self._tracer.nodes.get(self._node)
        if node is not None and node.op == "getattr" and isinstance(node.args[-1], str):
            name = node.args[-1]
            raise NotSupportedError(f".{name}(...) is not a whitelisted tensor method (see "
                                    "tpmlab.ir.ops.OPS for those a plan may call)")
        raise NotSupportedError("a traced value cannot be called")

    def __bool__(self) -> bool:
        raise NotSupportedError(CONTROL_FLOW)

    def __iter__(self):
        raise NotSupportedError(ITERATION)

    def __len__(self) -> int:
        raise TpmlabError("len() of a traced value is unknown while tracing")

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        node = self._tracer.nodes.get(self._node)
        return f"<Proxy of {node.describe() if node else self._node}>"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        fname = getattr(func, "__name__", str(func))
        name = irops.TORCH_FUNCTIONS.get(func)
        if name is None:
            raise NotSupportedError(f"torch function {fname!r} is not in the plan op whitelist "
                                    "(tpmlab.ir.ops); docs/nnsight.md lists the forms a plan "
                                    "may use")
        kwargs = dict(kwargs or {})
        # keywords torch's Python wrappers pass on by themselves, with no effect on the value
        # (inplace=True stays: validation refuses it, as every write through a keyword)
        kwargs.pop("_stacklevel", None)
        if kwargs.get("inplace") is False:
            del kwargs["inplace"]
        tracer = _find_tracer(args) or _find_tracer(list(kwargs.values()))
        return tracer.record(name, list(args), kwargs)


class PairProxy(Proxy):
    """A value of two parts, ``(args, kwargs)`` of a module's ``.inputs``: it unpacks
    (``args, kwargs = layer.inputs``) into a proxy of each."""

    __slots__ = ()

    def __iter__(self):
        return iter((self[0], self[1]))

    def __len__(self) -> int:
        return 2


# The seam the tracer uses (functions, not attributes: a proxy's attribute names belong to
# the traced value, ``h.node`` records a read of a field named "node").
def _recorder(tracer: Trace) -> Trace:
    """Where an op on a value of ``tracer`` is recorded: in the trace being recorded when the
    value comes from an earlier trace of the same session (the value is read there, from
    the engine), else in ``tracer`` itself."""
    stack = tracer.model.tracing._stack
    current = stack[-1] if stack else None
    if current is not None and current is not tracer and current.session is not None \
            and current.session is tracer.session:
        return current
    return tracer


def owner(proxy: Proxy) -> Trace:
    """The trace that recorded ``proxy``."""
    return proxy._tracer


def node_of(proxy: Proxy) -> int:
    """The id of the plan node ``proxy`` stands for."""
    return proxy._node


def deliver(proxy: Proxy, value: Any) -> None:
    """Give a saved proxy its value after the run."""
    proxy._set_value(value)


def _find_tracer(values: Any) -> Trace | None:
    for v in values:
        if isinstance(v, Proxy):
            return v._tracer
        if isinstance(v, (list, tuple)):
            found = _find_tracer(v)
            if found:
                return found
    return None


def _binary(op: str, reflected: bool = False):
    def method(self: Proxy, other: Any) -> Proxy:
        return self._op(op, other, self) if reflected else self._op(op, self, other)
    return method


def _unary(op: str):
    def method(self: Proxy) -> Proxy:
        return self._op(op, self)
    return method


for _dunder, _op in irops.BINARY_DUNDERS.items():
    setattr(Proxy, _dunder, _binary(_op))
for _dunder, _op in irops.REFLECTED_DUNDERS.items():
    setattr(Proxy, _dunder, _binary(_op, reflected=True))
for _dunder, _op in irops.INPLACE_DUNDERS.items():
    setattr(Proxy, _dunder, _binary(_op))
for _dunder, _op in irops.UNARY_DUNDERS.items():
    setattr(Proxy, _dunder, _unary(_op))


class BackwardBlock:
    """What ``loss.backward()`` returns: usable as ``with loss.backward(): ...`` (the
    gradients read inside and after it are the same)."""

    def __enter__(self) -> BackwardBlock:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __repr__(self) -> str:
        return "<backward>"
