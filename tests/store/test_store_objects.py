import uuid

import pytest

from tpmlab.store import FsspecObjectStore, LocalObjectStore, open_object_store
from tpmlab.store.errors import StoreInputError


@pytest.fixture(params=["local", "memory"])
def objects(request, tmp_path):
    if request.param == "local":
        return LocalObjectStore(tmp_path / "b")
    return FsspecObjectStore(f"memory://tpmlab-objects-{uuid.uuid4().hex}")


def test_object_store_contract(objects):
    key = "ab" + "0" * 62
    assert not objects.exists("chunks", key)
    objects.put("chunks", key, b"hello")
    assert objects.exists("chunks", key) and objects.get("chunks", key) == b"hello"
    assert objects.size("chunks", key) == 5
    objects.put("chunks", key, memoryview(b"hello!"))  # overwrite
    assert objects.get("chunks", key) == b"hello!"
    objects.put("tags", "v1", b"x")
    with pytest.raises(FileExistsError):
        objects.put("tags", "v1", b"y", overwrite=False)
    assert objects.get("tags", "v1") == b"x"
    objects.put("manifests", "cd" + "1" * 62, b"{}")
    assert list(objects.list("chunks")) == [key]
    assert list(objects.list("manifests")) == ["cd" + "1" * 62]
    assert list(objects.list("tags")) == ["v1"]
    objects.delete("chunks", key)
    objects.delete("chunks", key)  # absent: no error
    assert not objects.exists("chunks", key)
    with pytest.raises(KeyError):
        objects.get("chunks", key)
    with pytest.raises(KeyError):
        objects.size("chunks", key)


@pytest.mark.parametrize("key", ["../x", "a/b", ".hidden", "", "x" * 129])
def test_object_store_rejects_unsafe_keys(objects, key):
    with pytest.raises(StoreInputError, match="invalid"):
        objects.put("tags", key, b"")
    with pytest.raises(StoreInputError, match="unknown object kind"):
        objects.put("other", "k", b"")


def test_open_object_store(tmp_path):
    assert isinstance(open_object_store(tmp_path), LocalObjectStore)
    assert isinstance(open_object_store(f"file://{tmp_path}"), LocalObjectStore)
    assert isinstance(open_object_store(f"memory://x-{uuid.uuid4().hex}"), FsspecObjectStore)
    b = LocalObjectStore(tmp_path)
    assert open_object_store(b) is b
