"""Where the store's objects live: a small interface and two implementations.

An object store holds opaque byte objects in four namespaces (``kind``):
``"chunks"`` (tensor bytes by SHA-256), ``"manifests"`` (version JSON by version
digest), ``"tags"`` (a digest by tag name) and ``"locks"`` (see
``tpmlab.store.locks``). Every write is atomic: readers see the old object or the
new one, never a partial one. Chunks and manifests are content-addressed, so two
committers writing the same key write the same bytes. A tag is read only if it is
a plain object: a symbolic link in ``tags/`` (which could point anywhere) is refused.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import StoreInputError, UnsafeRefError
from .locks import FileLock

KINDS = ("chunks", "manifests", "tags", "locks")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_key(kind: str, key: str) -> None:
    """Reject unknown kinds and keys that are not plain names (no ``/``, no leading dot)."""
    if kind not in KINDS:
        raise StoreInputError(f"unknown object kind {kind!r}; expected one of {KINDS}")
    if not isinstance(key, str) or not _KEY.match(key):
        raise StoreInputError(
            f"invalid {kind} key {key!r}: expected 1-128 characters of letters, digits, "
            "'.', '_' or '-', not starting with '.', '_' or '-'"
        )


@runtime_checkable
class ObjectStore(Protocol):
    """Byte storage for the weight store."""

    def put(self, kind: str, key: str, data: bytes | memoryview, *, overwrite: bool = True) -> None:
        """Store ``data`` under ``key`` atomically.

        With ``overwrite=False`` an existing object is kept and ``FileExistsError`` raised.
        """

    def get(self, kind: str, key: str) -> bytes:
        """The bytes under ``key``; ``KeyError`` if there are none."""

    def exists(self, kind: str, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def list(self, kind: str) -> Iterator[str]:
        """Every key of ``kind`` (in no particular order)."""

    def delete(self, kind: str, key: str) -> None:
        """Remove the object under ``key``; no error if it is absent."""

    def size(self, kind: str, key: str) -> int:
        """Size in bytes of the object under ``key``; ``KeyError`` if absent."""


class LocalObjectStore:
    """A folder on a local (or shared POSIX) filesystem.

    Layout: ``chunks/ab/abcdef...`` (fan-out by the first two hex digits),
    ``manifests/<digest>.json``, ``tags/<name>``; ``tmp/`` holds writes in flight and
    ``locks/store.lock`` is the file the store's lock is taken on (``lock()``).
    A write goes to a temporary file in ``tmp/``, is flushed and fsynced, then
    renamed over the target (``os.replace``), which is atomic on POSIX; a
    create-only write uses ``os.link``, which fails if the target exists.
    """

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.durable = durable
        for sub in (*KINDS, "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, kind: str, key: str) -> Path:
        check_key(kind, key)
        if kind == "chunks":
            return self.root / kind / key[:2] / key
        if kind == "manifests":
            return self.root / kind / f"{key}.json"
        return self.root / kind / key

    def put(self, kind: str, key: str, data: bytes | memoryview, *, overwrite: bool = True) -> None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=f"{kind}-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)  # raises FileExistsError if the target exists
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def lock(self) -> FileLock:
        """The lock that orders commits and gc across processes (``tpmlab.store.locks``)."""
        return FileLock(self.root / "locks" / "store.lock")

    def get(self, kind: str, key: str) -> bytes:
        path = self._path(kind, key)
        if kind != "tags":
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise KeyError(f"{kind}/{key}") from None
        # O_NOFOLLOW: a tag that is a symbolic link is refused in the same call that opens it.
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise KeyError(f"{kind}/{key}") from None
        except OSError as e:
            if e.errno == errno.ELOOP or path.is_symlink():
                raise _symlinked_tag(key, path) from None
            raise
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def exists(self, kind: str, key: str) -> bool:
        return self._path(kind, key).is_file()

    def list(self, kind: str) -> Iterator[str]:
        check_key(kind, "x")
        base = self.root / kind
        if kind == "chunks":
            for sub in sorted(base.iterdir()):
                if sub.is_dir():
                    yield from (p.name for p in sub.iterdir() if p.is_file())
        elif kind == "manifests":
            yield from (p.name.removesuffix(".json") for p in base.glob("*.json"))
        else:  # symbolic links are listed so that reading them refuses them loudly
            yield from (p.name for p in base.iterdir() if p.is_file() or p.is_symlink())

    def delete(self, kind: str, key: str) -> None:
        self._path(kind, key).unlink(missing_ok=True)

    def size(self, kind: str, key: str) -> int:
        try:
            return self._path(kind, key).stat().st_size
        except FileNotFoundError:
            raise KeyError(f"{kind}/{key}") from None


class FsspecObjectStore:
    """Any fsspec filesystem (``memory://``, ``s3://``, ``gcs://``, ...), same layout as local.

    A write goes to ``tmp/<random>`` and is then moved into place. On object stores a
    single ``PUT`` is atomic anyway; ``overwrite=False`` there is check-then-write,
    which can race (only tags use it).
    """

    def __init__(self, url: str, **storage_options: object) -> None:
        import fsspec

        self.fs, path = fsspec.core.url_to_fs(url, **storage_options)
        self.url = url
        self.root = path.rstrip("/")
        for sub in (*KINDS, "tmp"):  # filesystems with real folders need tmp/ before a write
            self.fs.makedirs(f"{self.root}/{sub}", exist_ok=True)

    def __repr__(self) -> str:
        return f"FsspecObjectStore({self.url!r})"

    def _path(self, kind: str, key: str) -> str:
        check_key(kind, key)
        if kind == "chunks":
            return f"{self.root}/{kind}/{key[:2]}/{key}"
        if kind == "manifests":
            return f"{self.root}/{kind}/{key}.json"
        return f"{self.root}/{kind}/{key}"

    def put(self, kind: str, key: str, data: bytes | memoryview, *, overwrite: bool = True) -> None:
        path = self._path(kind, key)
        if not overwrite and self.fs.exists(path):
            raise FileExistsError(path)
        tmp = f"{self.root}/tmp/{kind}-{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, bytes(data))
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        self.fs.mv(tmp, path)

    def get(self, kind: str, key: str) -> bytes:
        path = self._path(kind, key)
        if kind == "tags" and getattr(self.fs, "islink", None) and self.fs.islink(path):
            raise _symlinked_tag(key, path)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise KeyError(f"{kind}/{key}") from None

    def exists(self, kind: str, key: str) -> bool:
        return self.fs.isfile(self._path(kind, key))

    def list(self, kind: str) -> Iterator[str]:
        check_key(kind, "x")
        base = f"{self.root}/{kind}"
        if not self.fs.exists(base):
            return
        for path in self.fs.find(base):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            yield name.removesuffix(".json") if kind == "manifests" else name

    def delete(self, kind: str, key: str) -> None:
        path = self._path(kind, key)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def size(self, kind: str, key: str) -> int:
        try:
            return int(self.fs.size(self._path(kind, key)))
        except FileNotFoundError:
            raise KeyError(f"{kind}/{key}") from None


def _symlinked_tag(name: str, path: object) -> UnsafeRefError:
    try:
        target = f" (to {os.readlink(path)})"  # type: ignore[arg-type]
    except (OSError, TypeError):
        target = ""
    return UnsafeRefError(f"tag {name!r} is a symbolic link{target}; tags must be plain files, "
                          f"so it is not followed. Remove it (tpmlab store tag -d {name}) and tag "
                          "the version again")


def open_object_store(root: str | os.PathLike[str] | ObjectStore) -> ObjectStore:
    """An object store for ``root``: an ObjectStore as is, a URL (``scheme://``) via fsspec, else a folder."""
    if isinstance(root, (LocalObjectStore, FsspecObjectStore)) or (
        not isinstance(root, (str, os.PathLike)) and isinstance(root, ObjectStore)
    ):
        return root
    text = os.fspath(root)
    if "://" in text and not text.startswith("file://"):
        return FsspecObjectStore(text)
    return LocalObjectStore(text.removeprefix("file://"))
