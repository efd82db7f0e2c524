"""Back-pressure: a bounded admission queue and per-key rate limits, both answered with 429 + Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

from serving.errors import APIError


class Admission:
    """At most `running` requests generate; at most `queue` more wait; the rest are refused at once."""

    def __init__(self, running: int, queue: int, timeout_s: float, gauge=None, running_gauge=None):
        self._sem = asyncio.Semaphore(running)
        self.capacity, self.max_queue, self.timeout_s = running, queue, timeout_s
        self.waiting = 0
        self.active = 0
        self._gauge, self._running_gauge = gauge, running_gauge

    @contextlib.asynccontextmanager
    async def slot(self):
        # Counted before the first await, so a burst sees its own earlier members.
        if self.active + self.waiting >= self.capacity + self.max_queue:
            raise APIError(429, "server busy: generation queue is full", code="queue_full",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        self._set_gauge()
        try:  # awaited in this task (no wait_for task), so a cancelled waiter (client gone) leaves at once
            async with asyncio.timeout(self.timeout_s):
                await self._sem.acquire()
        except TimeoutError:
            raise APIError(429, "server busy: timed out waiting in the queue", code="queue_timeout",
                           headers={"Retry-After": "2"}) from None
        finally:
            self.waiting -= 1
            self._set_gauge()
        self.active += 1
        self._set_gauge()
        try:
            yield
        finally:
            self.active -= 1
            self._set_gauge()
            self._sem.release()

    def _set_gauge(self):
        if self._gauge is not None:
            self._gauge.set(self.waiting)
        if self._running_gauge is not None:
            self._running_gauge.set(self.active)


class RateLimiter:
    """Token bucket per key: `per_min` requests a minute, bursts up to the same number."""

    def __init__(self, per_min: int):
        self.per_min = per_min
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key: str) -> None:
        if self.per_min <= 0:
            return
        rate = self.per_min / 60.0
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(self.per_min), now))
        tokens = min(float(self.per_min), tokens + (now - last) * rate)
        if tokens < 1.0:
            retry = math.ceil((1.0 - tokens) / rate)
            self._buckets[key] = (tokens, now)
            raise APIError(429, f"rate limit of {self.per_min} requests/min exceeded", code="rate_limited",
                           headers={"Retry-After": str(retry)})
        self._buckets[key] = (tokens - 1.0, now)
