"""A stand-in for CUDA IPC on CPU stages (:class:`tpmlab.cluster.cuda_ipc.Layer`): a send
buffer is a file in /dev/shm mapped shared, its handle the file's path; opening maps the
path in the receiving process. So the stages' hand-over logic (eligibility, the pool, the
cache of opened buffers, acknowledgements, fallback) runs across real worker processes
without a GPU. Install with :func:`install` (in every worker: ``client.run(install)``)."""

from __future__ import annotations

import mmap
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEVICE = "fake-host-memory"
PREFIX = "fake-ipc-"  # not handover's prefix: its tests count those files


class SharedFileLayer:
    """Buffers in /dev/shm files; ``fail_open``: every open fails (a handle that cannot be
    opened); ``opens``: how many buffers this process opened."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}  # buffer address -> its file
        self.files: list[str] = []  # every file made (an address may be reused)
        self.fail_open = False
        self.opens = 0

    def devices(self) -> list[str]:
        return [DEVICE]

    def device_of(self, t: torch.Tensor) -> str | None:
        return DEVICE if t.device.type == "cpu" else None

    def new_buffer(self, nbytes: int, device: torch.device) -> torch.Tensor:
        path = f"/dev/shm/{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        flat = _map(path, nbytes, create=True)
        self.paths[flat.data_ptr()] = path
        self.files.append(path)
        return flat

    def export(self, buffer: torch.Tensor) -> tuple[Any, Any]:
        return (self.paths[buffer.data_ptr()], buffer.numel()), None

    def signal(self, signal: Any) -> None:
        pass

    def open(self, handle: Any, index: int) -> tuple[torch.Tensor, Any]:
        if self.fail_open:
            raise RuntimeError("fake: this handle cannot be opened here")
        self.opens += 1
        path, nbytes = handle
        return _map(path, nbytes), None

    def wait(self, ready: Any, index: int) -> None:
        pass

    def fence(self, device: torch.device) -> Any:
        return None

    def settle(self, fence: Any) -> None:
        pass

    def close(self, opened: torch.Tensor) -> None:
        pass

    def cleanup(self) -> None:
        for path in self.files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths.clear()
        self.files.clear()


def _map(path: str, nbytes: int, create: bool = False) -> torch.Tensor:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, nbytes)
        m = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.from_numpy(np.frombuffer(m, dtype=np.uint8))


def install(fail_open: bool = False, dask_worker: Any = None) -> None:
    """Hand-overs in this process through a :class:`SharedFileLayer` from now on."""
    from tpmlab.cluster import cuda_ipc

    layer = cuda_ipc.LAYER if hasattr(cuda_ipc.LAYER, "cleanup") else SharedFileLayer()
    layer.fail_open = fail_open
    cuda_ipc.use_layer(layer)


def uninstall(dask_worker: Any = None) -> None:
    """Back to CUDA's layer; the stand-in's files are removed."""
    from tpmlab.cluster import cuda_ipc

    cleanup = getattr(cuda_ipc.LAYER, "cleanup", None)  # a stand-in, whichever copy of it
    if cleanup is not None:
        cleanup()
    cuda_ipc.use_layer(None)


def leftovers() -> list[str]:
    """The stand-in's files still in /dev/shm."""
    return sorted(str(p) for p in Path("/dev/shm").glob(f"{PREFIX}*"))


def set_env(value: str | None, dask_worker: Any = None) -> None:
    """``TPMLAB_CUDA_IPC`` in this process (``None``: unset)."""
    if value is None:
        os.environ.pop("TPMLAB_CUDA_IPC", None)
    else:
        os.environ["TPMLAB_CUDA_IPC"] = value
