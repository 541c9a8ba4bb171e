"""Commits and gc across processes: a shared/exclusive lock on the store.

A commit checks which chunks are already stored, writes the missing ones, then
writes its manifest; until the manifest is written, nothing refers to its
chunks, so a ``gc`` running in between would delete them. Commits therefore
hold the store's lock *shared* from that check until the manifest is written
(any number of them at once), and ``gc`` holds it *exclusive*.

Two implementations, one per kind of storage:

* ``FileLock`` (a local or shared POSIX folder): ``flock`` on ``locks/store.lock``.
  The kernel releases it when the holder exits, however it exits (Ctrl-C, a crash,
  ``kill -9``), so a lock is never left behind. Without ``fcntl`` (Windows) it
  falls back to ``filelock.FileLock``, which is exclusive only: commits then take
  turns, which is slower but as safe.
* ``ObjectLock`` (any other object store: fsspec's, where no file
  lock exists): each holder writes a lock object ``locks/<mode>-<id>`` and then
  lists the others; if one conflicts, it deletes its own and waits. Of two
  holders that conflict, the one that lists last sees the other, so they never
  both proceed (this needs a store whose listings show every completed write,
  as S3, GCS, Azure and local filesystems do). A holder rewrites its object every
  ``stale_after / 4`` seconds; an object older than ``stale_after`` (its writer
  died without cleaning up) is ignored and deleted. That time is the grace period
  of the scheme: a holder paused for longer than it (clocks skewed by more than it)
  could be overtaken.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from .errors import StoreLockedError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("tpmlab.store")

SHARED, EXCLUSIVE = "shared", "exclusive"
WAIT_NOTICE_S = 5.0  # say what we are waiting for once a wait has lasted this long


class StoreLock(Protocol):
    """The store's shared/exclusive lock (see the module docstring)."""

    def hold(self, mode: str, timeout: float | None = None) -> Iterator[None]:
        """Context manager: hold the lock in ``mode`` (``"shared"`` or ``"exclusive"``).

        Waits up to ``timeout`` seconds (``None``: as long as it takes), then raises
        ``StoreLockedError`` naming who holds it.
        """


def _check_mode(mode: str) -> None:
    if mode not in (SHARED, EXCLUSIVE):
        raise ValueError(f"lock mode must be {SHARED!r} or {EXCLUSIVE!r}, got {mode!r}")


class _Waiter:
    """Backoff between attempts, the deadline, and one notice for a long wait."""

    def __init__(self, what: str, timeout: float | None) -> None:
        self.what = what
        self.start = time.monotonic()
        self.deadline = None if timeout is None else self.start + timeout
        self.delay = 0.01
        self.noticed = False

    def wait(self, holders: str) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise StoreLockedError(f"could not take the {self.what} within "
                                   f"{self.deadline - self.start:g} s: {holders}")
        if not self.noticed and now - self.start >= WAIT_NOTICE_S:
            log.warning("waiting for the %s: %s", self.what, holders)
            self.noticed = True
        pause = self.delay * (0.5 + random.random())  # jitter: two waiters do not retry in step
        if self.deadline is not None:
            pause = min(pause, max(0.0, self.deadline - now))
        time.sleep(pause)
        self.delay = min(self.delay * 2, 1.0)


class FileLock:
    """``flock`` on a file: shared for commits, exclusive for gc (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FileLock({str(self.path)!r})"

    @contextmanager
    def hold(self, mode: str, timeout: float | None = None) -> Iterator[None]:
        _check_mode(mode)
        if fcntl is None:
            yield from self._hold_filelock(timeout)
            return
        # One open file per holder: flock locks belong to the open file, so threads of one
        # process (each with its own) share and exclude each other like separate processes.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            op = fcntl.LOCK_SH if mode == SHARED else fcntl.LOCK_EX
            waiter = _Waiter(f"{mode} store lock {self.path}", timeout)
            while True:
                try:
                    fcntl.flock(fd, op | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    other = "a gc" if mode == SHARED else "commits or a gc"
                    waiter.wait(f"{other} in another process or thread holds it")
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _hold_filelock(self, timeout: float | None) -> Iterator[None]:
        import filelock

        lock = filelock.FileLock(str(self.path), thread_local=False)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except filelock.Timeout:
            raise StoreLockedError(f"could not take the store lock {self.path} within "
                                   f"{timeout:g} s: another commit or gc holds it") from None
        try:
            yield
        finally:
            lock.release()


class ObjectLock:
    """Lock objects in an object store's ``locks`` namespace (see the module docstring).

    ``stale_after``: seconds after which a lock object that was not refreshed is
    taken to belong to a dead process.
    """

    def __init__(self, objects, *, stale_after: float = 600.0) -> None:
        self.objects = objects
        self.stale_after = stale_after

    def __repr__(self) -> str:
        return f"ObjectLock({self.objects!r})"

    def _record(self, mode: str) -> bytes:
        return json.dumps({"mode": mode, "host": socket.gethostname(), "pid": os.getpid(),
                           "time": time.time()}).encode()

    def _others(self, mine: str) -> list[tuple[str, dict]]:
        """Live lock objects other than ``mine``; stale ones are deleted on the way."""
        out = []
        for key in list(self.objects.list("locks")):
            if key == mine:
                continue
            try:
                rec = json.loads(self.objects.get("locks", key))
                age = time.time() - float(rec["time"])
            except KeyError:
                continue  # released meanwhile
            except (ValueError, TypeError):
                rec, age = {"mode": EXCLUSIVE}, 0.0  # unreadable (being written?): respect it
            if age > self.stale_after:
                log.warning("removing stale store lock %s (%s, %.0f s old)", key, rec, age)
                self.objects.delete("locks", key)
                continue
            out.append((key, rec))
        return out

    @contextmanager
    def hold(self, mode: str, timeout: float | None = None) -> Iterator[None]:
        _check_mode(mode)
        key = f"{mode}-{uuid.uuid4().hex}"
        waiter = _Waiter(f"{mode} store lock of {self.objects!r}", timeout)
        while True:
            self.objects.put("locks", key, self._record(mode))
            others = self._others(key)
            conflicts = [(k, r) for k, r in others if mode == EXCLUSIVE or k.startswith(EXCLUSIVE)]
            if not conflicts:
                break
            self.objects.delete("locks", key)
            held = ", ".join(f"{r.get('mode')} by {r.get('host')}:{r.get('pid')}"
                             for _, r in conflicts)
            waiter.wait(f"held {held}")
        stop = threading.Event()
        refresher = threading.Thread(target=self._refresh, args=(key, mode, stop), daemon=True,
                                     name="tpmlab-store-lock")
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            refresher.join()
            self.objects.delete("locks", key)

    def _refresh(self, key: str, mode: str, stop: threading.Event) -> None:
        while not stop.wait(self.stale_after / 4):
            try:
                self.objects.put("locks", key, self._record(mode))
            except Exception as e:  # keep trying: the next refresh may get through
                log.warning("could not refresh store lock %s: %s", key, e)


def store_lock(objects) -> StoreLock:
    """The lock for ``objects``: its own (``objects.lock()``) if it has one, else lock objects."""
    own = getattr(objects, "lock", None)
    return own() if callable(own) else ObjectLock(objects)
