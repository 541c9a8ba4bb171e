"""Nannies keep forking workers from the preloaded server while a cluster started that way
lives (a restarted worker starts as the first ones did), and the setting is undone after."""

from __future__ import annotations

import gc

import pytest

dask = pytest.importorskip("dask")


def test_keep_forking_holds_the_method_while_a_cluster_lives():
    from tpmlab.cluster import warm_start

    key = "distributed.worker.multiprocessing-method"
    with dask.config.set({key: "spawn"}):
        class Cluster:  # any object a finalizer can watch
            pass

        a, b = Cluster(), Cluster()
        warm_start.keep_forking(a)
        warm_start.keep_forking(b)
        assert dask.config.get(key) == "forkserver"
        del a
        gc.collect()
        assert dask.config.get(key) == "forkserver"  # b still lives
        del b
        gc.collect()
        assert dask.config.get(key) == "spawn"
