import multiprocessing as mp
from concurrent.futures import ThreadPoolExecutor

import torch

from tpmlab.store import Store


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
