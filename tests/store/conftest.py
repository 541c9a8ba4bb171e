import uuid

import pytest

from tpmlab.store import Store


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "store")


@pytest.fixture
def mem_store():
    import fsspec

    root = f"memory://tpmlab-test-{uuid.uuid4().hex}"
    yield Store(root)
    fs = fsspec.filesystem("memory")
    fs.rm(root.removeprefix("memory://"), recursive=True)
