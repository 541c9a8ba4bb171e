"""One real LocalCluster of worker processes shared by every cluster test (starting one
costs several seconds on two cores), and an in-process reference lab on the same weights."""

from __future__ import annotations

import logging

import pytest

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="session")
def cluster():
    from distributed import LocalCluster

    from tpmlab.cluster.warm_start import forked_workers

    with forked_workers():  # workers forked with torch imported, as the embedded cluster's
        c = LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                         dashboard_address=":0", silence_logs=logging.ERROR)
    yield c
    c.close()


@pytest.fixture(scope="session")
def backend(cluster):
    from distributed import Client

    from tpmlab.cluster import DaskBackend

    client = Client(cluster)
    b = DaskBackend(client=client, timeout=120)
    yield b
    b.close()
    client.close()


@pytest.fixture(scope="session")
def lab(backend):
    from tpmlab.lab import Lab

    return Lab(backend)


@pytest.fixture(scope="session")
def ref_lab():
    import tpmlab

    lab = tpmlab.connect("local", device="cpu")
    yield lab
    lab.close()


def set_link_env(value, dask_worker=None):
    """``TPMLAB_STAGE_LINK`` set to ``value`` (``None``: unset) in this process, or on each
    worker through ``client.run``; read when a link is made."""
    import os

    from tpmlab.cluster import stage_link

    if value is None:
        os.environ.pop(stage_link.ENV, None)
    else:
        os.environ[stage_link.ENV] = value


def notebook_links(backend, name: str, seconds: float = 30.0) -> list:
    """The backend's links to each stage of ``name``, once all are up (the notebook links
    to a stage after its first call to it)."""
    import time

    keys = [a.key for a in backend.deployment(name).actors]
    deadline = time.monotonic() + seconds
    while not all(backend._links.get(k) is not None and backend._links[k].alive
                  for k in keys):
        assert time.monotonic() < deadline, backend._links
        time.sleep(0.05)
    return [backend._links[k] for k in keys]


def deploy(lab, name: str, stages: int):
    """(Re)deploy ``name`` with ``stages`` stages on the shared cluster."""
    lab.undeploy(name)
    return lab.model(name, stages=stages)


@pytest.fixture(scope="module")
def gpu_lab():
    """Two GPU workers (sharing the GPU where there is one) and a lab on them, for the GPU
    tests (they skip without CUDA before asking for it)."""
    import sys
    from pathlib import Path

    from distributed import Client

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the benchmarks package
    from benchmarks.cluster_gpu import start_gpu_cluster
    from tpmlab.cluster import DaskBackend
    from tpmlab.lab import Lab

    cluster = start_gpu_cluster(2)  # with one GPU, both workers share it
    client = Client(cluster)
    lab = Lab(DaskBackend(client=client, timeout=300))
    yield lab
    lab.close()
    client.close()
    cluster.close()
