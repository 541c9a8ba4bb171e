import logging
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tpmlab.store import FsspecObjectStore, Store, StoreLockedError
from tpmlab.store.locks import ObjectLock


def _versions(seed: int) -> list[dict[str, torch.Tensor]]:
    shared = torch.arange(50_000, dtype=torch.float32)  # the same in every committer
    out = []
    for i in range(3):
        g = torch.Generator().manual_seed(seed * 10 + i)
        out.append({"shared": shared, "own": torch.randn(20_000, generator=g), "step": torch.tensor(i)})
    return out


def _commit_all(root: str, seed: int) -> list[str]:
    store = Store(root)
    digests, parent = [], None
    for sd in _versions(seed):
        parent = store.commit(sd, config={"seed": seed}, message=f"{seed}", parent=parent)
        digests.append(parent)
    store.tag(f"worker-{seed}", parent)
    return digests


def test_concurrent_processes_do_not_corrupt(tmp_path):
    root = str(tmp_path / "store")
    Store(root)
    # spawn, not fork: the test process may already run threads (torch, a Dask client), and a
    # forked child can inherit a held lock and hang.
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        results = pool.starmap_async(_commit_all, [(root, s) for s in (1, 2, 3, 1)]).get(timeout=180)
    store = Store(root)
    assert results[0] == results[3]  # the same commits give the same digests
    assert store.verify().ok
    assert len(store.versions()) == 9
    assert sorted(store.tags()) == ["worker-1", "worker-2", "worker-3"]
    for seed, digests in zip((1, 2, 3), results):
        for sd, d in zip(_versions(seed), digests):
            out = store.load(d)
            assert all(torch.equal(out[k], sd[k]) for k in sd)
    assert not any((tmp_path / "store" / "tmp").iterdir())  # no temp files left behind


def test_concurrent_threads_same_store_object(mem_store):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: _commit_all_with(mem_store, s), (4, 5, 4, 5)))
    assert results[0] == results[2]
    assert mem_store.verify().ok and len(mem_store.versions()) == 6


def _commit_all_with(store: Store, seed: int) -> list[str]:
    parent, digests = None, []
    for sd in _versions(seed):
        parent = store.commit(sd, config={"seed": seed}, message="", parent=parent)
        digests.append(parent)
    return digests


# -- gc beside commits in other processes -------------------------------------------------------

def _gc_until(root: str, started, done, fsspec: bool) -> int:
    """Run gc over and over until ``done`` is set; return how many passes ran."""
    store = _open(root, fsspec)
    started.set()
    passes = 0
    while not done.is_set() or passes == 0:
        store.gc()
        passes += 1
    return passes


def _commit_many(root: str, started, done, fsspec: bool, n_versions: int) -> list[str]:
    """Commit versions of 64 fresh tensors each (64 new chunks), while gc runs elsewhere."""
    store = _open(root, fsspec)
    assert started.wait(120), "the gc process did not start"
    digests = []
    try:
        for v in range(n_versions):
            g = torch.Generator().manual_seed(1000 + v)
            sd = {f"t{i}": torch.randn(2048, generator=g) for i in range(64)}
            digests.append(store.commit(sd, config={"v": v}, message=f"v{v}"))
    finally:
        done.set()
    return digests


def _open(root: str, fsspec: bool) -> Store:
    # A store reached through fsspec (as an object store would be) has no file lock to share.
    return Store(FsspecObjectStore(f"file://{root}") if fsspec else root)


@pytest.mark.parametrize("fsspec", [False, True], ids=["folder", "fsspec"])
def test_gc_in_another_process_never_deletes_a_commit_in_flight(tmp_path, fsspec):
    root = str(tmp_path / "store")
    _open(root, fsspec)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        started, done = manager.Event(), manager.Event()
        gc = pool.apply_async(_gc_until, (root, started, done, fsspec))
        commits = pool.apply_async(_commit_many, (root, started, done, fsspec, 6))
        digests = commits.get(timeout=300)
        passes = gc.get(timeout=300)
    assert passes >= 1
    store = _open(root, fsspec)
    report = store.verify()
    assert report.ok, str(report)
    for v, d in enumerate(digests):
        g = torch.Generator().manual_seed(1000 + v)
        expected = {f"t{i}": torch.randn(2048, generator=g) for i in range(64)}
        out = store.load(d)
        assert all(torch.equal(out[k], expected[k]) for k in expected)


# -- the lock itself, held by another process ---------------------------------------------------

def _hold_lock(root: str, fsspec: bool, modes: list[str], held: list, release: list,
               hard_exit: bool) -> None:
    """Hold the store's lock in each of ``modes`` in turn, until told to let go of it."""
    store = _open(root, fsspec)
    for mode, is_held, let_go in zip(modes, held, release):
        with store.lock.hold(mode, timeout=60):
            is_held.set()
            if hard_exit:
                os._exit(0)  # dies holding it, as a killed process would
            assert let_go.wait(120)


def _holder(root: str, fsspec: bool, modes: list[str], hard_exit: bool = False):
    ctx = mp.get_context("spawn")
    held, release = [ctx.Event() for _ in modes], [ctx.Event() for _ in modes]
    proc = ctx.Process(target=_hold_lock, args=(root, fsspec, modes, held, release, hard_exit))
    proc.start()
    return proc, held, release


@pytest.mark.parametrize("fsspec", [False, True], ids=["folder", "fsspec"])
def test_gc_and_commits_in_two_processes_exclude_each_other(tmp_path, fsspec):
    root = str(tmp_path / "store")
    store = _open(root, fsspec)
    proc, held, release = _holder(root, fsspec, ["shared", "exclusive"])
    try:
        # another process is committing (holds the lock shared): gc waits for it ...
        assert held[0].wait(120), "the other process did not take the lock"
        with pytest.raises(StoreLockedError, match="could not take the exclusive store lock"):
            store.gc(timeout=0.5)
        # ... while commits share the lock with each other
        store.commit({"x": torch.ones(3)}, config={}, message="beside another commit")
        release[0].set()
        # another process runs gc (holds it exclusive): a commit waits for it
        assert held[1].wait(120), "the other process did not take the lock exclusive"
        with pytest.raises(StoreLockedError, match="could not take the shared store lock"):
            with store.lock.hold("shared", timeout=0.5):
                pass
    finally:
        for event in release:
            event.set()
        proc.join(60)
    assert proc.exitcode == 0
    assert store.gc(timeout=60).chunks_kept == 1


def test_a_lock_is_released_when_its_process_dies(tmp_path):
    root = str(tmp_path / "store")
    store = _open(root, False)
    proc, held, _ = _holder(root, False, ["exclusive"], hard_exit=True)
    proc.join(60)
    assert held[0].is_set()
    store.commit({"x": torch.ones(3)}, config={}, message="after a crashed gc")  # no wait


def test_a_lock_object_of_a_dead_process_goes_stale(tmp_path, caplog):
    root = str(tmp_path / "store")
    store = _open(root, True)
    proc, held, _ = _holder(root, True, ["exclusive"], hard_exit=True)
    proc.join(60)
    assert held[0].is_set()
    assert list(store.objects.list("locks"))  # left behind
    store.lock = ObjectLock(store.objects, stale_after=1.0)
    with pytest.raises(StoreLockedError, match="exclusive by"):
        with store.lock.hold("shared", timeout=0.2):
            pass
    with caplog.at_level(logging.WARNING, logger="tpmlab.store"):
        with store.lock.hold("shared", timeout=60):
            pass
    assert "stale store lock" in caplog.text
    assert not list(store.objects.list("locks"))
