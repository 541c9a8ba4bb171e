"""Fixtures for the server extension: pytest-jupyter's server fixtures and one in-process
Dask cluster (threads, not processes: handler tests need a real scheduler, not speed)."""

from __future__ import annotations

import logging

import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403  (fixtures and async test hooks)


@pytest.fixture(scope="session")
def dask_cluster():
    from distributed import LocalCluster

    c = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                     dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
    yield c
    c.close()


@pytest.fixture
def scheduler_address(dask_cluster):
    return dask_cluster.scheduler_address


@pytest.fixture
def jp_server_config(scheduler_address, monkeypatch):
    monkeypatch.delenv("TPMLAB_GATEWAY", raising=False)  # no gateway unless a test names one
    return {"ServerApp": {"jpserver_extensions": {"tpmlab.server": True}},
            "TpmlabServer": {"scheduler_address": scheduler_address}}


@pytest.fixture
def tpmlab_state(jp_serverapp):
    state = jp_serverapp.web_app.settings["tpmlab_state"]
    yield state
    state.close()
