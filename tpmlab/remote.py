"""Remote values: saves that stay where they were made, for work too large to fetch.

``h = model.layers[6].output[:, -1].save(remote=True)`` keeps the value on the worker
of the stage that computed it; after the trace ``h.value`` is a :class:`RemoteValue`:
its ``shape`` and ``dtype``, a Dask future on that worker (``.future``), and
``.to_dask_array()``. :func:`concatenate` (or :func:`stack`) joins the values of many
traces into one ``dask.array`` whose chunks stay on the workers, so a notebook reduces
gigabytes of activations there (``x.mean(0)``, ``x.T @ x``) and ``.compute()`` fetches only
the result, or writes them to Zarr in parallel from the workers
(``dask.array.to_zarr(x, path)``; the workers must reach ``path``).

Lifetime: a remote value is freed when its :class:`RemoteValue` is garbage collected
(Dask releases its future), by :meth:`RemoteValue.release`, by ``lab.release_remote()``
and ``lab.undeploy(name)``, and when the lab closes. Each stage holds one owner's remote
values to ``Limits.max_remote_bytes`` and ``max_remote_values``; past them the request
fails with :class:`~tpmlab.cluster.errors.RemoteLimitError` and keeps nothing.
Behind the gateway remote saves are refused (its tiers set ``max_remote_bytes`` to 0).

In process (``connect("local")``) a remote value wraps the saved tensor itself, with the
same API: a notebook runs unchanged on either engine.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


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
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
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

    def fetch(self) -> torch.Tensor:
        """Bring the whole value to the notebook as a tensor (what a plain save returns)."""
        if self._local is not None:
            return self._local
        if self.future is None:
            raise ValueError("this remote value was released")
        return torch.from_numpy(np.asarray(self.future.result()).copy())

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
    their workers (e.g. a residual dataset ``[prompts, d_model]`` over many traces)."""
    import dask.array as da

    return da.concatenate([v.to_dask_array() for v in values], axis=axis)


def stack(values: Iterable[RemoteValue], axis: int = 0):
    """One ``dask.array`` of many same-shaped remote values stacked along a new ``axis``."""
    import dask.array as da

    return da.stack([v.to_dask_array() for v in values], axis=axis)


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
