"""The base of every lens result: the data, where it came from, a table and a figure.

Computation and plotting are kept apart: a lens function returns a
:class:`LensResult` subclass holding tensors (``data``) and provenance
(:class:`Provenance`); ``.table()`` flattens it into a list of dicts (no pandas
needed; ``.to_pandas()`` when pandas is installed) and ``.plot()`` builds a
plotly figure from the data alone, without running anything.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._version import __version__


@dataclass
class Provenance:
    """What produced a result: the model, its weights' version and the plans that ran.

    ``plan_digests`` holds one digest per trace the lens ran (in order);
    :attr:`plan_digest` is that digest when there was one trace, else a digest of the list.
    """

    model: str = ""
    model_version: str = ""
    plan_digests: list[str] = field(default_factory=list)
    tpmlab_version: str = __version__

    @classmethod
    def from_traces(cls, model: Any, *traces: Any) -> Provenance:
        prov = cls(model=getattr(model, "name", ""), model_version=getattr(model, "version", ""))
        for tr in traces:
            prov.add(tr)
        return prov

    def add(self, trace: Any) -> None:
        """Record a finished trace (anything with ``.result.meta``)."""
        meta = trace.result.meta if getattr(trace, "result", None) is not None else {}
        if meta.get("model_version"):
            self.model_version = meta["model_version"]
        if meta.get("tpmlab_version"):
            self.tpmlab_version = meta["tpmlab_version"]
        if meta.get("plan_digest"):
            self.plan_digests.append(meta["plan_digest"])

    @property
    def plan_digest(self) -> str:
        if len(self.plan_digests) == 1:
            return self.plan_digests[0]
        h = hashlib.sha256("\n".join(self.plan_digests).encode())
        return "sha256:" + h.hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_version": self.model_version,
                "plan_digest": self.plan_digest, "plan_digests": list(self.plan_digests),
                "tpmlab_version": self.tpmlab_version}


@dataclass
class LensResult:
    """Tensors computed by a lens, with provenance. Subclasses add named views,
    :meth:`table` rows and a :meth:`plot`."""

    data: dict[str, torch.Tensor]
    provenance: Provenance
    options: dict[str, Any] = field(default_factory=dict)

    lens: ClassVar[str] = "lens"

    @property
    def model_version(self) -> str:
        return self.provenance.model_version

    @property
    def plan_digest(self) -> str:
        return self.provenance.plan_digest

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.data[key]

    def table(self) -> list[dict[str, Any]]:
        """One dict per row (plain Python values)."""
        raise NotImplementedError

    def to_pandas(self):
        """The table as a ``pandas.DataFrame`` (needs pandas, which tpmlab does not require)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_pandas() needs pandas; .table() gives the same rows as a "
                              "list of dicts") from e
        return pd.DataFrame(self.table())

    def plot(self, **kwargs: Any):
        """A plotly figure of this result."""
        raise NotImplementedError

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self.data.items()
                           if isinstance(v, torch.Tensor))
        return (f"<{type(self).__name__} {self.provenance.model} "
                f"{self.model_version[:19]} {shapes}>")


def plain(value: Any) -> Any:
    """A tensor element (or anything) as a plain Python value for tables (``-0.0`` as ``0.0``)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    return value + 0.0 if isinstance(value, float) else value  # IEEE: -0.0 + 0.0 == +0.0


def shown(value: Any, spec: str = ".4f") -> str:
    """``format(value, spec)`` for people, with no sign on a number that rounds to zero.

    ``-0.00001`` and ``-0.0`` show as ``"0.0000"``, not ``"-0.0000"``: a quantity that is
    zero up to rounding noise (which changes with the order of a reduction, so with the
    thread count) must print the same every time.
    """
    value = float(value)
    text = format(value, spec)
    mantissa = re.split("[eE]", text)[0]
    if math.isfinite(value) and "-" in mantissa and not any(c in "123456789" for c in mantissa):
        return format(0.0, spec)
    return text
