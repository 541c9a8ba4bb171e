"""Deployments published on the scheduler, so that every client sees the same stages.

A deployment is published as a Dask *named dataset* (``Client.publish_dataset``)
under ``tpmlab:<model>@<version>``: the scheduler keeps its stage actors' futures
alive, and a second client asking for the same model and version attaches to them
instead of loading another copy. A ``distributed.Lock`` of the same name keeps two
clients from deploying one model at once.

This module owns the published form: :class:`DeploymentRecord` is what is published,
and :func:`list_deployments`, :func:`probe` and :func:`remove` are how anything outside
the engine (the server extension's sidebar, say) reads, asks and removes deployments
without knowing how they are stored.
"""

from __future__ import annotations

import logging
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass
from typing import Any, Literal

from distributed import Client, Future, Lock

from ..ir.model_info import ModelInfo
from .partition import StageSpan
from .placement import Placement

log = logging.getLogger(__name__)

PREFIX = "tpmlab:"
PROBE_TIMEOUT = 2.0  # seconds to wait for one stage's actor, then for its answer


@dataclass
class DeploymentRecord:
    """One model's stages as published on the scheduler: what every client attaches to.

    ``futures``, ``placements``, ``spans`` and ``specs`` hold one entry per stage, in
    pipeline order: the stage actor's future, where it lives, the layers it holds and
    the spec it was loaded from.
    """

    key: str
    futures: list[Future]
    info: ModelInfo
    placements: list[Placement]
    spans: list[StageSpan]
    specs: list[dict[str, Any]]

    @property
    def name(self) -> str:
        """The model's name (every version of it shares the name)."""
        return self.info.name

    @property
    def stage_bytes(self) -> list[int]:
        """Per stage, the parameter bytes it holds (as the stage reported them on load)."""
        return list(self.info.extra.get("stage_bytes") or [s.nbytes for s in self.spans])

    def to_wire(self) -> dict[str, Any]:
        """The published dataset: plain lists and dicts (the futures in a top-level list,
        where Dask finds them and keeps the actors alive)."""
        return {"futures": list(self.futures), "info": self.info.to_dict(),
                "placements": [[p.worker, p.device] for p in self.placements],
                "spans": [asdict(s) for s in self.spans], "specs": self.specs}

    @classmethod
    def from_wire(cls, key: str, data: dict[str, Any]) -> DeploymentRecord:
        """The record published under ``key``, from its dataset (see :meth:`to_wire`)."""
        return cls(key=key, futures=list(data["futures"]), info=ModelInfo.from_dict(data["info"]),
                   placements=[Placement(*p) for p in data["placements"]],
                   spans=[StageSpan(**s) for s in data["spans"]], specs=list(data["specs"]))


@dataclass(frozen=True)
class StageProbe:
    """What one stage's actor answered when asked for its memory and running requests.

    ``status``: ``"answered"``; ``"slow"`` (no answer within the probe's timeout: a busy or
    first-contacted stage, not an unhealthy one); ``"failed"`` (the call raised: its actor
    is gone or broken). Byte counts are of the stage's worker process (``rss``) and device
    (``cuda_allocated``, ``None`` on CPU).
    """

    status: Literal["answered", "slow", "failed"]
    requests: int | None = None
    rss: int | None = None
    cuda_allocated: int | None = None
    peak_rss: int | None = None  # since the stage was loaded
    cuda_peak: int | None = None  # since the stage was loaded

    @classmethod
    def from_memory(cls, memory: dict[str, int]) -> StageProbe:
        """From a stage actor's ``memory()`` answer."""
        return cls("answered", requests=memory.get("requests"), rss=memory.get("rss"),
                   cuda_allocated=memory.get("cuda_allocated"), peak_rss=memory.get("peak_rss"),
                   cuda_peak=memory.get("cuda_peak"))


def deployment_key(model: str, version: str) -> str:
    """The dataset name of a deployment: ``tpmlab:<model>@<version>``."""
    return f"{PREFIX}{model}@{version}"


def lookup(client: Client, key: str) -> DeploymentRecord | None:
    """The published record for ``key`` (its futures bound to ``client``), or ``None``."""
    if key not in client.list_datasets():
        return None
    try:
        return DeploymentRecord.from_wire(key, client.get_dataset(key))
    except KeyError:
        return None


def publish(client: Client, record: DeploymentRecord) -> None:
    """Publish (or replace) a deployment record."""
    client.publish_dataset(**{record.key: record.to_wire()}, override=True)


def unpublish(client: Client, key: str) -> None:
    """Remove the record published under ``key``, if there is one."""
    if key in client.list_datasets():
        client.unpublish_dataset(key)


def list_deployments(client: Client) -> list[DeploymentRecord]:
    """Every tpmlab deployment on the cluster, by key."""
    keys = sorted(k for k in client.list_datasets() if isinstance(k, str) and k.startswith(PREFIX))
    found = (lookup(client, key) for key in keys)
    return [record for record in found if record is not None]


def probe(client: Client, record: DeploymentRecord,
          timeout: float = PROBE_TIMEOUT) -> list[StageProbe]:
    """Ask each stage of ``record`` for its memory and running requests (see :class:`StageProbe`)."""
    out = []
    # Stage actors unpickled from the scheduler look for "the current client" to call.
    with client.as_current():
        for future in record.futures:
            try:
                actor = future.result(timeout=timeout)
                out.append(StageProbe.from_memory(actor.memory().result(timeout=timeout)))
            except (TimeoutError, FuturesTimeout):
                out.append(StageProbe("slow"))
            except Exception:
                log.debug("stage probe failed", exc_info=True)
                out.append(StageProbe("failed"))
    return out


def remove(client: Client, name: str) -> list[str]:
    """Unpublish every version of model ``name``; returns the keys removed. Clients that
    still hold its stages keep them until they let go (then the actors and their memory go)."""
    keys = [r.key for r in list_deployments(client) if r.name == name]
    for key in keys:
        unpublish(client, key)
    return keys


def deploy_lock(client: Client, key: str) -> Lock:
    """The cluster-wide lock that one client holds while it deploys or heals ``key``."""
    return Lock(key, scheduler_rpc=client.scheduler, loop=client.loop)
