"""Remote values: saves that stay where they were made, for work too large to fetch.

``h = model.layers[6].output[:, -1].save(remote=True)`` keeps the value on the worker
of the stage that computed it; after the trace ``h.value`` is a :class:`RemoteValue`:
its ``shape`` and ``dtype``, a Dask future on that worker (``.future``), and
``.to_dask_array()``. :func:`concatenate` (or :func:`stack`) joins the values of many
traces into one ``dask.array`` whose chunks stay on the workers, so a notebook reduces
gigabytes of activations there (``x.mean(0)``, ``x.T @ x``) and ``.compute()`` fetches only
the result, or writes them to Zarr in parallel from the workers
(``dask.array.to_zarr(x, path)``; the workers must reach ``path``).

One value is also read where it is: :meth:`RemoteValue.fetch` takes an index (ints and
slices, bounds checked) and brings only what it selects; :meth:`RemoteValue.reduce` runs
one of the whitelisted reductions (:data:`REDUCTIONS`: ``sum``, ``mean``, ``min``,
``max``, ``std``, ``var`` over dims, and ``gram``, ``XᵀX``) on the value's worker and
brings only the result. :func:`reduce_all` and :func:`fetch_all` read many values in
one call of the engine (one Dask computation; behind the gateway one request, priced
once). All are the same code on every engine; behind the gateway they are requests to it (:mod:`tpmlab.gateway.remote_values`), held to the tier's limits and
priced in its ledger.

Lifetime: a remote value is freed when its :class:`RemoteValue` is garbage collected
(Dask releases its future), by :meth:`RemoteValue.release`, by ``lab.release_remote()``
and ``lab.undeploy(name)``, and when the lab closes. Each stage holds one owner's remote
values to ``Limits.max_remote_bytes`` and ``max_remote_values``; past them the request
fails with :class:`~tpmlab.cluster.errors.RemoteLimitError` and keeps nothing.
Behind the gateway each user's values are held to their tier's limits, over all stages
and models, and also expire after the gateway's ``remote_value_ttl``.

In process (``connect("local")``) a remote value wraps the saved tensor itself, with the
same API: a notebook runs unchanged on any engine.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import RemoteValueError
from .ir.dtypes import NUMPY_LACKS

#: The reductions a remote value runs where it is (:meth:`RemoteValue.reduce`), by name:
#: numpy's (``std`` and ``var`` are the population ones, ``ddof=0``) over ``dims`` (all when
#: ``None``), and ``gram``: the value as rows ``X [-1, last dim]``, ``XᵀX [last, last]``.
REDUCTIONS = ("sum", "mean", "min", "max", "std", "var", "gram")
#: dtypes a reduction may compute in (``None``: the value's own)
REDUCE_DTYPES = ("float32", "float64")

Index = tuple[int | slice, ...]


def kept_nbytes(value: torch.Tensor) -> int:
    """Bytes a remote value of ``value``'s shape and dtype takes where it is kept (dtypes
    numpy lacks are kept as float32)."""
    return value.numel() * (4 if value.dtype in NUMPY_LACKS else value.element_size())


def check_index(shape: tuple[int, ...], index: Any) -> tuple[Index, tuple[int, ...]]:
    """``index`` (an int, a slice, or a tuple of them: one per leading dim) checked against
    ``shape``; returns it as a tuple of plain ints and slices, and the shape it selects.
    Ints must lie in ``[-n, n)``, slice bounds in ``[-n, n]`` and steps be positive, else
    :class:`~tpmlab.errors.RemoteValueError` names the dim."""
    items = index if isinstance(index, tuple) else (index,)
    if len(items) > len(shape):
        raise RemoteValueError(f"an index of {len(items)} items for a value of {len(shape)} "
                               f"dims {list(shape)}")
    out: list[int | slice] = []
    dims: list[int] = []
    for d, (item, n) in enumerate(zip(items, shape)):
        if isinstance(item, slice):
            parts = (item.start, item.stop, item.step)
            if not all(p is None or _is_int(p) for p in parts):
                raise RemoteValueError(f"the slice of dim {d} has bounds that are not ints: "
                                       f"{_show(item)}")
            start, stop, step = (None if p is None else int(p) for p in parts)
            if step is not None and step <= 0:
                raise RemoteValueError(f"the slice of dim {d} has step {step}: steps must be "
                                       "positive")
            for bound in (start, stop):
                if bound is not None and not -n <= bound <= n:
                    raise RemoteValueError(f"the slice {_show(item)} of dim {d} is out of "
                                           f"bounds for its size {n}")
            s = slice(start, stop, step)
            out.append(s)
            dims.append(len(range(n)[s]))
        elif _is_int(item):
            if not -n <= int(item) < n:
                raise RemoteValueError(f"index {int(item)} is out of bounds for dim {d} of "
                                       f"size {n}")
            out.append(int(item))
        else:
            raise RemoteValueError(f"dim {d} is indexed by {type(item).__name__} {item!r:.80}: "
                                   "a remote value takes ints and slices")
    return tuple(out), tuple(dims) + tuple(shape[len(items):])


def index_to_wire(index: Index) -> list[Any]:
    """A checked index as JSON: an int, or ``[start, stop, step]`` for a slice."""
    return [[i.start, i.stop, i.step] if isinstance(i, slice) else i for i in index]


def index_from_wire(items: list[Any]) -> tuple[int | slice, ...]:
    """Inverse of :func:`index_to_wire` (still to be checked with :func:`check_index`)."""
    return tuple(slice(*i) if isinstance(i, list) and len(i) == 3 else i for i in items)


def check_reduction(shape: tuple[int, ...], op: str, dims: Any = None, keepdim: bool = False,
                    dtype: str | None = None) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """A reduction checked against a value of ``shape``: its dims (non-negative, ``None``
    for all) and the shape of its result. Raises
    :class:`~tpmlab.errors.RemoteValueError` naming what is not allowed."""
    if op not in REDUCTIONS:
        raise RemoteValueError(f"{str(op)[:80]!r} is not a reduction a remote value runs; "
                               f"they are {', '.join(REDUCTIONS)}")
    if dtype is not None and dtype not in REDUCE_DTYPES:
        raise RemoteValueError(f"a reduction computes in {' or '.join(REDUCE_DTYPES)} (or the "
                               f"value's own dtype), not {str(dtype)[:40]!r}")
    if op == "gram":
        if dims is not None or keepdim:
            raise RemoteValueError("gram takes no dims: it is XᵀX of the value as rows "
                                   "[-1, last dim]")
        if not shape:
            raise RemoteValueError("gram needs a value of at least one dim, not a scalar")
        return None, (shape[-1], shape[-1])
    if dims is None:
        return None, tuple(1 for _ in shape) if keepdim else ()
    items = (dims,) if _is_int(dims) else dims
    if not isinstance(items, (list, tuple)) or not all(_is_int(d) for d in items):
        raise RemoteValueError(f"dims must be ints, got {dims!r:.80}")
    out = []
    for d in items:
        if not -len(shape) <= int(d) < len(shape):
            raise RemoteValueError(f"dim {int(d)} is out of range for a value of {len(shape)} "
                                   f"dims {list(shape)}")
        out.append(int(d) % len(shape))
    if len(set(out)) != len(out):
        raise RemoteValueError(f"dims {list(items)} name a dim twice")
    kept = tuple(1 if k in out else n for k, n in enumerate(shape)) if keepdim else \
        tuple(n for k, n in enumerate(shape) if k not in out)
    return tuple(out), kept


DESCRIPTION = "tpmlab_remote_value"  # the key of a remote value's description in a result


def described(value: Any) -> dict[str, Any] | None:
    """The description of a remote value kept behind a gateway (handle, model, shape,
    dtype, nbytes), as its request's decoded result carries it; None for any other value."""
    if isinstance(value, dict) and set(value) == {DESCRIPTION} \
            and isinstance(value[DESCRIPTION], dict):
        return value[DESCRIPTION]
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _show(s: slice) -> str:
    return ":".join("" if p is None else str(p) for p in (s.start, s.stop, s.step)).rstrip(":") \
        or ":"


class RemoteValue:
    """A saved value that stays on a worker (or, in process, a local tensor).

    ``shape``, ``dtype`` (numpy's name; ``bfloat16`` is kept as ``float32``), ``nbytes``,
    ``worker`` (the address holding it; ``None`` in process), ``future`` (the Dask future
    of the array; ``None`` in process).
    """

    def __init__(self, *, shape: tuple[int, ...], dtype: str, nbytes: int,
                 worker: str | None = None, future: Any = None,
                 local: torch.Tensor | None = None, on_release: Any = None) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype
        self.nbytes = nbytes
        self.worker = worker
        self.future = future
        self._local = local
        self._on_release = on_release  # frees the value on its worker if never taken
        self._array: Any = None
        self._finalizer = None
        if future is not None and on_release is not None:
            # dropped before its take ran: the take may never run, free the value anyway
            self._finalizer = weakref.finalize(self, _free_if_untaken, future, on_release)
            self._finalizer.atexit = False

    @classmethod
    def in_process(cls, tensor: torch.Tensor) -> RemoteValue:
        t = tensor.detach().cpu()
        if t.dtype in NUMPY_LACKS:
            t = t.float()
        return cls(shape=tuple(t.shape), dtype=str(t.numpy().dtype),
                   nbytes=t.numel() * t.element_size(), local=t)

    @property
    def released(self) -> bool:
        return self.future is None and self._local is None

    def to_dask_array(self):
        """The value as a one-chunk ``dask.array`` (on its worker; in process, in memory)."""
        import dask.array as da

        if self._array is None:
            if self.released:
                raise ValueError("this remote value was released")
            if self._local is not None:
                self._array = da.from_array(self._local.numpy(), chunks=self.shape)
            else:
                self._array = da.from_delayed(self.future, shape=self.shape,
                                              dtype=np.dtype(self.dtype))
        return self._array

    def fetch(self, index: Any = None) -> torch.Tensor:
        """Bring the value to the notebook as a tensor (what a plain save returns); with
        ``index`` (ints and slices, e.g. ``np.s_[:, -1]``; see :func:`check_index`) only the
        part it selects, cut on the worker."""
        idx = check_index(self.shape, index)[0] if index is not None else ()
        if self._local is not None:
            return self._local[idx].clone() if idx else self._local
        if self.future is None:
            raise ValueError("this remote value was released")
        if idx:
            return self._compute(self.to_dask_array()[idx])
        return torch.from_numpy(np.asarray(self.future.result()).copy())

    def reduce(self, op: str, dims: Any = None, *, keepdim: bool = False,
               dtype: str | None = None) -> torch.Tensor:
        """One of :data:`REDUCTIONS` computed where the value is, only the result brought
        back: ``op`` over ``dims`` (an int or a list; ``None``: every dim), keeping them as
        size 1 with ``keepdim``, in ``dtype`` (``float32``/``float64``; ``None``: the
        value's). ``gram``: ``XᵀX [d, d]`` of the value as rows ``X [-1, d]``, ``d`` its
        last dim (what a probe or a PCA needs)."""
        return self._compute(self._reduction(op, dims, keepdim, dtype))

    def _reduction(self, op: str, dims: Any, keepdim: bool, dtype: str | None) -> Any:
        """The reduction, checked, as a dask computation (not run yet)."""
        axes = check_reduction(self.shape, op, dims, keepdim, dtype)[0]
        x = self.to_dask_array()
        if dtype is not None:
            x = x.astype(dtype)
        if op == "gram":
            x = x.reshape(-1, self.shape[-1])
            return x.T @ x
        return getattr(x, op)(axis=axes, keepdims=keepdim)

    # -- many values at once (reduce_all, fetch_all): one call of the engine per group ------
    def _group(self) -> Any:
        """What values read together share: the Dask client of their futures (in process:
        none)."""
        return ("dask", id(client)) if (client := getattr(self.future, "client", None)) \
            else ("local",)

    @staticmethod
    def _reduce_group(values: list[RemoteValue], op: str, dims: Any, keepdim: bool,
                      dtype: str | None) -> list[torch.Tensor]:
        return values[0]._compute_all([v._reduction(op, dims, keepdim, dtype) for v in values])

    @staticmethod
    def _fetch_group(values: list[RemoteValue]) -> list[torch.Tensor]:
        if any(v.released for v in values):
            raise ValueError("a remote value was released")
        futures = [v.future for v in values if v._local is None]
        client = getattr(futures[0], "client", None) if futures else None
        got = iter(client.gather(futures) if client is not None else
                   [f.result() for f in futures])
        return [v._local if v._local is not None else
                torch.from_numpy(np.asarray(next(got)).copy()) for v in values]

    @staticmethod
    def _group_arrays(values: list[RemoteValue]) -> list[Any]:
        """The values as ``dask.array`` chunks, where they are (:func:`concatenate`)."""
        return [v.to_dask_array() for v in values]

    @staticmethod
    def _fetch_all(values: list[RemoteValue]) -> list[torch.Tensor]:
        return fetch_all(values)

    def _compute_all(self, xs: list[Any]) -> list[torch.Tensor]:
        """Several dask computations over values of this one's group, in one call."""
        import dask

        client = getattr(self.future, "client", None)
        outs = client.compute(xs, sync=True) if client is not None else \
            dask.compute(*xs, scheduler="sync")
        return [torch.from_numpy(np.array(out, copy=True)) for out in outs]

    def _compute(self, x: Any) -> torch.Tensor:
        """A dask computation over this value: on its worker (the future's client) or, in
        process, here in this thread."""
        client = getattr(self.future, "client", None)
        out = client.compute(x, sync=True) if client is not None else \
            x.compute(scheduler="sync")
        return torch.from_numpy(np.array(out, copy=True))

    def release(self) -> None:
        """Free the value on its worker now (dropping the object does the same, later)."""
        self._array = None
        self._local = None
        future, self.future = self.future, None
        if self._finalizer is not None:
            self._finalizer.detach()
        if future is not None:
            if self._on_release is not None:
                _free_if_untaken(future, self._on_release)
            future.release()

    def __repr__(self) -> str:
        where = "released" if self.released else (f"on {self.worker}" if self.worker
                                                  else "in process")
        return f"<RemoteValue {list(self.shape)} {self.dtype} {where}>"


def _free_if_untaken(future: Any, on_release: Any) -> None:
    if not future.done():
        on_release()


def concatenate(values: Iterable[RemoteValue], axis: int = 0):
    """One ``dask.array`` of many remote values joined along ``axis``; its chunks stay on
    their workers (e.g. a residual dataset ``[prompts, d_model]`` over many traces). Behind a
    gateway the chunks are fetched when it is built, in one request, into the notebook
    (reduce each with :func:`reduce_all` to bring back less)."""
    import dask.array as da

    return da.concatenate(_arrays(values), axis=axis)


def reduce_all(values: Iterable[RemoteValue], op: str, dims: Any = None, *,
               keepdim: bool = False, dtype: str | None = None) -> list[torch.Tensor]:
    """:meth:`RemoteValue.reduce` of every value (same ``op``, ``dims``, ``keepdim``,
    ``dtype``), the same numbers as one by one, in as few calls of the engine as it allows:
    on Dask, one computation of all of them; behind a gateway, one request per model (of
    at most the gateway's ``max_read_values`` values; priced once). E.g. the mean residual
    over many traces: ``sum(reduce_all(vs, "sum", [0, 1])) / rows``, and its Gram matrix:
    ``sum(reduce_all(vs, "gram"))``."""
    values = list(values)
    for v in values:
        check_reduction(v.shape, op, dims, keepdim, dtype)  # refused before anything runs
    return _by_group(values, lambda group: group[0]._reduce_group(group, op, dims, keepdim,
                                                                  dtype))


def fetch_all(values: Iterable[RemoteValue]) -> list[torch.Tensor]:
    """:meth:`RemoteValue.fetch` of every whole value, in as few calls of the engine as it
    allows (behind a gateway, one request per model, priced once)."""
    return _by_group(list(values), lambda group: group[0]._fetch_group(group))


def _arrays(values: Iterable[RemoteValue]) -> list[Any]:
    """Each value as a ``dask.array``, read together by group (behind a gateway, computing
    them is one request per model, not one per value)."""
    return _by_group(list(values), lambda group: type(group[0])._group_arrays(group))


def _by_group(values: list[RemoteValue], read: Any) -> list[Any]:
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(v._group(), []).append(i)
    out: list[Any] = [None] * len(values)
    for idx in groups.values():
        for i, t in zip(idx, read([values[i] for i in idx])):
            out[i] = t
    return out


def stack(values: Iterable[RemoteValue], axis: int = 0):
    """One ``dask.array`` of many same-shaped remote values stacked along a new ``axis``."""
    import dask.array as da

    return da.stack(_arrays(values), axis=axis)


class RemoteValues:
    """The remote values a backend made, by model, so they can be freed together (a weak
    set: a value the notebook dropped is already gone)."""

    def __init__(self) -> None:
        self._by_model: dict[str, weakref.WeakSet[RemoteValue]] = {}

    def add(self, model: str, value: RemoteValue) -> None:
        self._by_model.setdefault(model, weakref.WeakSet()).add(value)

    def release(self, model: str | None = None) -> int:
        """Release every live value (of ``model``); how many were released."""
        names = list(self._by_model) if model is None else [model]
        n = 0
        for name in names:
            for value in list(self._by_model.pop(name, ())):
                if not value.released:
                    value.release()
                    n += 1
        return n


def wrap_local(values: dict[int, Any], remote_ids: Iterable[int]) -> dict[int, Any]:
    """In process: the saved tensors of remote saves as :class:`RemoteValue` (lists per
    generation step stay lists)."""
    out = dict(values)
    for i in remote_ids:
        if i in out:
            v = out[i]
            out[i] = [RemoteValue.in_process(t) for t in v] if isinstance(v, list) \
                else RemoteValue.in_process(v)
    return out
