"""A version's parent, message and timestamp are covered by its history record: edits are
caught by verify (and by log); versions an older tpmlab wrote keep their digests and are
sealed by the migration."""

import json

import pytest
import torch
from store_helpers import tiny_state_dict

from tpmlab.store import Store, StoreIntegrityError
from tpmlab.store.cli import main as store_cli
from tpmlab.store.manifest import LEGACY_FORMAT


def _path(store: Store, digest: str):
    return store.objects.root / "manifests" / f"{digest}.json"


def _edit(store: Store, digest: str, **fields) -> dict:
    path = _path(store, digest)
    m = json.loads(path.read_text())
    m.update(fields)
    path.write_text(json.dumps(m, indent=1))
    return m


def _history(store: Store) -> list[str]:
    sd = tiny_state_dict()
    v1 = store.commit(sd, config={}, message="base")
    v2 = store.commit({**sd, "norm.weight": sd["norm.weight"] * 2}, config={}, message="tuned",
                      parent=v1)
    v3 = store.commit({**sd, "norm.weight": sd["norm.weight"] * 3}, config={}, message="again",
                      parent=v2)
    return [v1, v2, v3]


def _fresh(store: Store) -> Store:
    return Store(store.objects.root)  # no cached manifests


def test_history_record_chains_to_the_parent(store):
    v1, v2, v3 = _history(store)
    assert store.verify().ok and not store.verify().unsealed
    infos = {i.digest: i for i in store.log(v3)}
    assert infos[v2].history and infos[v2].history != infos[v1].history
    assert store.manifest(v3)["parent_history"] == infos[v2].history
    assert store.manifest(v1)["parent_history"] is None


@pytest.mark.parametrize("field,value", [
    ("message", "an edited message"),
    ("timestamp", "1999-01-01T00:00:00Z"),
    ("parent", None),
])
def test_editing_a_history_field_is_caught(store, field, value):
    v1, v2, v3 = _history(store)
    _edit(store, v2, **{field: value})
    fresh = _fresh(store)
    report = fresh.verify()
    assert not report.ok
    assert any(e.reason == "history edited" and e.chunk == v2 for e in report.errors), str(report)
    assert "history record of version" in str(report)
    with pytest.raises(StoreIntegrityError, match="was edited"):
        fresh.log(v3)
    # the weights are untouched: loading still works, and the version digest is the same
    assert set(fresh.load(v2)) == set(tiny_state_dict())


def test_rewriting_an_ancestor_with_a_new_record_is_caught_by_its_child(store):
    from tpmlab.store.manifest import seal

    v1, v2, v3 = _history(store)
    m = json.loads(_path(store, v2).read_text())
    m["message"] = "rewritten"
    m = seal(m, v2, m["parent_history"])  # a consistent record for the edited fields
    _path(store, v2).write_text(json.dumps(m))
    report = _fresh(store).verify()
    assert not report.ok
    assert any("history of version" in str(e) and e.chunk == v2 for e in report.errors)


def test_removing_the_record_of_an_ancestor_is_caught(store):
    v1, v2, v3 = _history(store)
    m = json.loads(_path(store, v2).read_text())
    for key in ("history", "parent_history"):
        del m[key]
    m["format"] = LEGACY_FORMAT
    _path(store, v2).write_text(json.dumps(m))
    report = _fresh(store).verify()
    assert v2 in report.unsealed
    assert not report.ok  # v3 was committed on v2's record, which is gone


def _as_written_by_an_older_tpmlab(store: Store, digest: str) -> None:
    """Rewrite a manifest exactly as tpmlab wrote it before history records existed."""
    m = json.loads(_path(store, digest).read_text())
    old = {k: m[k] for k in ("hash", "chunk_size", "parent", "message", "timestamp", "config",
                             "tensors")}
    _path(store, digest).write_text(json.dumps({"format": LEGACY_FORMAT, **old}, indent=1))


def test_versions_an_older_tpmlab_wrote_load_and_are_sealed_by_the_migration(store, capsys):
    v1, v2, v3 = _history(store)
    store.tag("release", v3)
    for d in (v1, v2, v3):
        _as_written_by_an_older_tpmlab(store, d)
    old = _fresh(store)
    assert old.resolve("release") == v3
    assert [i.digest for i in old.log("release")] == [v3, v2, v1]
    assert [i.history for i in old.log(v3)] == [None, None, None]
    assert torch.equal(old.load(v2)["norm.weight"], tiny_state_dict()["norm.weight"] * 2)
    report = old.verify()
    assert report.ok and sorted(report.unsealed) == sorted([v1, v2, v3])
    assert "tpmlab store seal" in str(report)
    # a version committed on an unsealed parent, before the migration
    v4 = old.commit({**tiny_state_dict(), "extra": torch.ones(3)}, config={}, message="new",
                    parent=v3)
    assert old.verify().ok

    assert store_cli(["store", "seal", "--store", str(store.objects.root)]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted([v1, v2, v3, v4])
    sealed = _fresh(store)
    report = sealed.verify()
    assert report.ok and not report.unsealed, str(report)
    assert sealed.resolve("release") == v3  # the same digests: tags and results stay valid
    assert [i.message for i in sealed.log(v4)] == ["new", "again", "tuned", "base"]
    assert sealed.seal_history() == []  # nothing left to do
    # from now on, editing the old versions' history is caught like any other
    _edit(sealed, v1, message="edited later")
    assert not _fresh(store).verify().ok
