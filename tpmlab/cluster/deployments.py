"""Deployments published on the scheduler, so that every client sees the same stages.

A deployment is published as a Dask *named dataset* (``Client.publish_dataset``)
under ``tpmlab:<model>@<version>``: the scheduler keeps its stage actors' futures
alive, and a second client asking for the same model and version attaches to them
instead of loading another copy. A ``distributed.Lock`` of the same name keeps two
clients from deploying one model at once.
"""

from __future__ import annotations

from typing import Any

from distributed import Client, Lock

PREFIX = "tpmlab:"


def deployment_key(model: str, version: str) -> str:
    return f"{PREFIX}{model}@{version}"


def lookup(client: Client, key: str) -> dict[str, Any] | None:
    """The published record for ``key`` (its futures bound to ``client``), or ``None``."""
    if key not in client.list_datasets():
        return None
    try:
        return client.get_dataset(key)
    except KeyError:
        return None


def publish(client: Client, key: str, record: dict[str, Any]) -> None:
    """Publish (or replace) a deployment record: ``{"futures": [...], "info": {...}, ...}``."""
    client.publish_dataset(**{key: record}, override=True)


def unpublish(client: Client, key: str) -> None:
    if key in client.list_datasets():
        client.unpublish_dataset(key)


def all_records(client: Client) -> dict[str, dict[str, Any]]:
    """Every tpmlab deployment on the cluster."""
    out = {}
    for key in client.list_datasets():
        if isinstance(key, str) and key.startswith(PREFIX):
            rec = lookup(client, key)
            if rec is not None:
                out[key] = rec
    return out


def deploy_lock(client: Client, key: str) -> Lock:
    return Lock(key, scheduler_rpc=client.scheduler, loop=client.loop)
