import pytest
import torch
from store_helpers import tiny_state_dict

from tpmlab.store import FsspecObjectStore, RefError, Store, StoreError, UnsafeRefError
from tpmlab.store.errors import StoreInputError


def _history(store, n=3):
    sd = tiny_state_dict()
    digests, parent = [], None
    for i in range(n):
        sd = dict(sd, **{"norm.weight": sd["norm.weight"] + i})
        parent = store.commit(sd, config={"step": i}, message=f"step {i}", parent=parent)
        digests.append(parent)
    return digests


def test_log_follows_parents(store):
    d = _history(store)
    log = store.log(d[2])
    assert [v.digest for v in log] == d[::-1]
    assert [v.message for v in log] == ["step 2", "step 1", "step 0"]
    assert log[0].parent == d[1] and log[-1].parent is None
    assert log[0].timestamp.endswith("Z") and log[0].n_tensors == len(tiny_state_dict())


def test_tags_resolve_and_move(store):
    d = _history(store)
    store.tag("stable", d[0])
    assert store.resolve("stable") == d[0]
    assert store.load("stable")["norm.weight"].sum() == 16
    with pytest.raises(StoreError, match="force"):
        store.tag("stable", d[1])
    store.tag("stable", d[0])  # same target: fine
    store.tag("stable", d[1], force=True)
    assert store.tags() == {"stable": d[1]}
    assert [v.digest for v in store.log("stable")] == [d[1], d[0]]
    store.untag("stable")
    assert store.tags() == {}
    with pytest.raises(StoreInputError, match="tag name"):
        store.tag("a/b", d[0])
    with pytest.raises(StoreInputError, match="tag name"):
        store.tag(d[0], d[0])


def test_resolve_prefixes(store):
    d = _history(store)
    assert store.resolve(d[1][:10]) == d[1]
    assert store.resolve("sha256:" + d[1]) == d[1]
    assert store.load(d[2][:8]).keys() == tiny_state_dict().keys()
    with pytest.raises(RefError, match="no version"):
        store.resolve("0" * 64)
    with pytest.raises(RefError, match="no version"):
        store.resolve("abc")  # too short to be a prefix
    with pytest.raises(RefError):
        store.resolve("nosuchtag")


def test_ambiguous_prefix(store):
    # resolving reads only manifest names, so placeholders with chosen digests suffice
    for tail in ("0" * 60, "1" * 60):
        store.objects.put("manifests", "abcd" + tail, b"{}")
    with pytest.raises(RefError, match="ambiguous: matches 2"):
        store.resolve("abcd")
    assert store.resolve("abcd1") == "abcd" + "1" * 60
    with pytest.raises(RefError):
        store.resolve("abc")  # below the 4-digit minimum


def test_diff_reports_changes(store):
    sd = tiny_state_dict()
    a = store.commit(sd, config={}, message="a")
    w = sd["layers.0.mlp.weight"].clone()
    w[0, :4] += 0.5
    sd2 = {**sd, "layers.0.mlp.weight": w, "new.bias": torch.zeros(3)}
    del sd2["norm.weight"]
    sd2["layers.1.norm.weight"] = sd["layers.1.norm.weight"].half()
    b = store.commit(sd2, config={}, message="b", parent=a)
    store.stats.reset()
    diffs = {d.name: d for d in store.diff(a, b)}
    assert set(diffs) == {"layers.0.mlp.weight", "new.bias", "norm.weight", "layers.1.norm.weight"}
    ch = diffs["layers.0.mlp.weight"]
    assert ch.status == "changed" and ch.changed_fraction == pytest.approx(4 / (32 * 16))
    assert ch.max_abs == pytest.approx(0.5, abs=1e-6)
    expected = float((w - sd["layers.0.mlp.weight"]).norm() / sd["layers.0.mlp.weight"].norm())
    assert ch.rel_fro == pytest.approx(expected, rel=1e-5)
    assert diffs["new.bias"].status == "added" and diffs["norm.weight"].status == "removed"
    assert diffs["layers.1.norm.weight"].status == "reshaped"
    # only the changed tensor was read, once per side
    assert store.stats.chunks_read == 2
    assert store.diff(a, a) == []
    assert "changed=" in str(ch)


@pytest.mark.parametrize("via", ["folder", "fsspec"])
def test_a_tag_that_is_a_symbolic_link_is_refused(tmp_path, via):
    root = tmp_path / "store"
    store = Store(root) if via == "folder" else Store(FsspecObjectStore(f"file://{root}"))
    d = _history(store)
    store.tag("stable", d[0])
    # A link to a file elsewhere that happens to hold a digest (another store's tag, or any
    # file the link's author wants read): it must not be followed.
    outside = tmp_path / "elsewhere"
    outside.write_text(f"{d[1]}\n")
    (root / "tags" / "evil").symlink_to(outside)
    (root / "tags" / "alias").symlink_to(root / "tags" / "stable")
    for name in ("evil", "alias"):
        with pytest.raises(UnsafeRefError, match=f"tag '{name}' is a symbolic link"):
            store.resolve(name)
        with pytest.raises(UnsafeRefError):
            store.load(name)
    with pytest.raises(UnsafeRefError, match="symbolic link"):
        store.tags()
    with pytest.raises(StoreError):
        store.tag("evil", d[2])  # an existing link is not written through either
    assert outside.read_text() == f"{d[1]}\n"
    store.untag("evil")
    store.untag("alias")
    assert store.tags() == {"stable": d[0]}
    assert not outside.is_symlink() and outside.exists()
