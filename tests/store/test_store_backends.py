import uuid

import pytest

from tpmlab.store import FsspecBackend, LocalBackend, open_backend


@pytest.fixture(params=["local", "memory"])
def backend(request, tmp_path):
    if request.param == "local":
        return LocalBackend(tmp_path / "b")
    return FsspecBackend(f"memory://tpmlab-backend-{uuid.uuid4().hex}")


def test_backend_contract(backend):
    key = "ab" + "0" * 62
    assert not backend.exists("chunks", key)
    backend.put("chunks", key, b"hello")
    assert backend.exists("chunks", key) and backend.get("chunks", key) == b"hello"
    assert backend.size("chunks", key) == 5
    backend.put("chunks", key, memoryview(b"hello!"))  # overwrite
    assert backend.get("chunks", key) == b"hello!"
    backend.put("tags", "v1", b"x")
    with pytest.raises(FileExistsError):
        backend.put("tags", "v1", b"y", overwrite=False)
    assert backend.get("tags", "v1") == b"x"
    backend.put("manifests", "cd" + "1" * 62, b"{}")
    assert list(backend.list("chunks")) == [key]
    assert list(backend.list("manifests")) == ["cd" + "1" * 62]
    assert list(backend.list("tags")) == ["v1"]
    backend.delete("chunks", key)
    backend.delete("chunks", key)  # absent: no error
    assert not backend.exists("chunks", key)
    with pytest.raises(KeyError):
        backend.get("chunks", key)
    with pytest.raises(KeyError):
        backend.size("chunks", key)


@pytest.mark.parametrize("key", ["../x", "a/b", ".hidden", "", "x" * 129])
def test_backend_rejects_unsafe_keys(backend, key):
    with pytest.raises(ValueError, match="invalid"):
        backend.put("tags", key, b"")
    with pytest.raises(ValueError, match="unknown object kind"):
        backend.put("other", "k", b"")


def test_open_backend(tmp_path):
    assert isinstance(open_backend(tmp_path), LocalBackend)
    assert isinstance(open_backend(f"file://{tmp_path}"), LocalBackend)
    assert isinstance(open_backend(f"memory://x-{uuid.uuid4().hex}"), FsspecBackend)
    b = LocalBackend(tmp_path)
    assert open_backend(b) is b
