"""Throttling failed authentication per client address (token buckets).

Each address has a bucket of ``burst`` tokens refilled at ``rate`` tokens per second;
every failed authentication takes one. While an address's bucket is empty its requests
are answered 429 with ``Retry-After`` before any credential is checked, so guessing
keys (or hammering JupyterHub through the gateway) goes no faster than ``rate``.
Successful requests take nothing. Memory is bounded: full buckets are forgotten.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class FailureThrottle:
    """Token buckets of failed authentications, one per client address."""

    def __init__(self, burst: int = 20, rate: float = 0.5, *, max_addresses: int = 100_000,
                 clock=time.monotonic) -> None:
        if burst < 1 or rate <= 0:
            raise ValueError("burst must be >= 1 and rate > 0")
        self.burst, self.rate, self.max_addresses = float(burst), float(rate), max_addresses
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _level(self, address: str, now: float) -> _Bucket:
        b = self._buckets.get(address)
        if b is None:
            return _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        b.at = now
        return b

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: it may try now)."""
        with self._lock:
            b = self._level(address, self._clock())
            return 0.0 if b.tokens >= 1.0 else (1.0 - b.tokens) / self.rate

    def failed(self, address: str) -> None:
        """Count one failed authentication from ``address``."""
        with self._lock:
            now = self._clock()
            b = self._level(address, now)
            b.tokens = max(b.tokens - 1.0, 0.0)
            self._buckets[address] = b
            if len(self._buckets) > self.max_addresses:
                self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        for addr in [a for a, b in self._buckets.items()
                     if b.tokens + (now - b.at) * self.rate >= self.burst]:
            del self._buckets[addr]
        while len(self._buckets) > self.max_addresses:  # all busy: drop the oldest
            del self._buckets[min(self._buckets, key=lambda a: self._buckets[a].at)]


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
