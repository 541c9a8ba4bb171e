"""What the gateway remembers of each request, and for how long.

A :class:`Request` holds its plan (with its constant tensors) only until it has run;
after that it keeps its status and, for a while, its result, so that a client that
submitted without waiting (or whose wait timed out) can fetch it. :class:`RequestTable`
bounds what finished requests keep, per user: results are dropped oldest first once a
user's kept bytes exceed ``max_bytes_per_user`` (fetching such a result is 410), but
never the newest one (which may alone be larger), nor one a client is being handed; whole
records go once they are older than ``keep_seconds`` or the user's records alone exceed
the budget (each record counts :data:`RECORD_BYTES` on top of its result). So a user's
finished requests keep at most the budget plus one result.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..ir.plan import Plan
from .ledger import UserView
from .units import Hold

RECORD_BYTES = 1024  # what a finished request's status costs to keep, roughly
FINISHED = ("done", "failed", "cancelled")


@dataclass(eq=False)
class Request:
    id: str
    user: UserView
    model: str
    mode: str
    plan: Plan | None  # dropped once the request has run (it holds the plan's constants)
    blob: bytes | None  # the plan's bytes, dropped with it
    digest: str
    tokens: int
    hold: Hold
    mergeable: bool
    created: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued | running | done | failed | cancelled
    finished: float | None = None
    result: bytes | None = None
    result_dropped: bool = False
    error: Exception | None = None
    units: float = 0.0
    batch_size: int = 0
    held: bool = False  # whether the ledger holds units for it
    cost: dict[str, float] = field(default_factory=dict)  # what it used (units.py), once run
    readers: int = 0  # waiters about to read its result (never dropped under them)
    future: asyncio.Future | None = None
    remote_bytes: int | None = 0  # what its remote saves keep (None: known once it has run)
    remote_values: int = 0  # how many values they keep
    session: ClassVar[bool] = False  # a session's traces, run as one request (.sessions)

    def traces(self) -> list[Plan]:
        """The plans it runs, in order: its one plan (none once dropped)."""
        return [self.plan] if self.plan is not None else []

    @property
    def estimate(self) -> float:
        return self.hold.units

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "model": self.model, "state": self.state,
                               "mode": self.mode, "tokens": self.tokens,
                               "estimated_units": round(self.hold.units, 6),
                               "units": round(self.units, 6), "batch_size": self.batch_size}
        if self.error is not None:
            out["error"] = type(self.error).__name__
            out["message"] = str(self.error)
        if self.result_dropped:
            out["result"] = "dropped"
        return out

    def drop_plan(self) -> None:
        """Forget the plan and its bytes (the constants go with them)."""
        self.plan = None
        self.blob = None

    def kept_bytes(self) -> int:
        return RECORD_BYTES + len(self.result or b"")


class RequestTable:
    """Requests by id, with per-user bounds on what finished ones keep."""

    def __init__(self, *, keep_seconds: float, max_bytes_per_user: int) -> None:
        self.keep_seconds = keep_seconds
        self.max_bytes_per_user = max_bytes_per_user
        self._by_id: dict[str, Request] = {}
        self._finished: dict[int, OrderedDict[str, Request]] = {}  # per user, oldest first
        self._kept: dict[int, int] = {}  # per user: bytes kept by finished requests

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def add(self, req: Request) -> None:
        self._by_id[req.id] = req

    def values(self) -> list[Request]:
        return list(self._by_id.values())

    def in_flight(self) -> list[Request]:
        return [r for r in self._by_id.values() if r.state not in FINISHED]

    def finished(self, req: Request) -> None:
        """``req`` has just finished: keep it within its user's bounds."""
        req.drop_plan()
        uid = req.user.id
        self._finished.setdefault(uid, OrderedDict())[req.id] = req
        self._kept[uid] = self._kept.get(uid, 0) + req.kept_bytes()
        self.prune(uid)

    def prune(self, uid: int | None = None) -> None:
        """Forget expired records, and keep each user within the byte budget: drop the
        oldest results, and forget the oldest records while records alone exceed it."""
        horizon = time.monotonic() - self.keep_seconds
        for user in ([uid] if uid is not None else list(self._finished)):
            done = self._finished.get(user)
            if not done:
                continue
            while done:
                oldest = next(iter(done.values()))
                if oldest.finished is not None and oldest.finished < horizon:
                    self._forget(user, oldest)
                else:
                    break
            for req in list(done.values())[:-1]:  # the newest result stays until fetched
                if self._kept[user] <= self.max_bytes_per_user:
                    break
                if req.result is not None and not req.readers:
                    self._kept[user] -= len(req.result)
                    req.result, req.result_dropped = None, True
            while len(done) > 1 and len(done) * RECORD_BYTES > self.max_bytes_per_user:
                self._forget(user, next(iter(done.values())))
            if not done:
                del self._finished[user]
                self._kept.pop(user, None)

    def _forget(self, uid: int, req: Request) -> None:
        self._finished[uid].pop(req.id, None)
        self._kept[uid] -= req.kept_bytes()
        self._by_id.pop(req.id, None)

    def kept_bytes(self, uid: int) -> int:
        """Bytes kept for user ``uid``'s finished requests (results and records)."""
        return self._kept.get(uid, 0)
