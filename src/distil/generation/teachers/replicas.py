"""Replicas of one endpoint teacher (`teacher.base_url` as a list): which one takes the next request.

Each request goes to the least-loaded replica (fewest requests in flight; ties to the one that
has served fewest rows), at most `max_concurrency` in flight on each. A replica whose request
failed in a way that says the server is unwell (connection error, 5xx, timeout) is left out for
`teacher.replica_cooldown` seconds while others are up, then tried again with one request at a
time until one succeeds. When every replica is out, the one back soonest is used anyway, so a
single endpoint behaves as before (its retries back off; they are not held for the cool-down).

Example:
    >>> pool = ReplicaPool(["http://a:8000/v1", "http://b:8000/v1"], per_replica=8, cooldown=30)
    >>> async with pool.take() as replica:
    ...     resp = await client.post(replica.url + "chat/completions", json=body)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Replica:
    """One endpoint root and what it did this run."""
    url: str                     # ends with "/"
    in_flight: int = 0
    rows: int = 0
    completion_tokens: int = 0
    errors: Counter = field(default_factory=Counter)  # failed requests by reason
    taken_out: int = 0           # times it was left out for a cool-down
    out_until: float = 0.0       # clock time it is back (0: in)
    probing: bool = False        # back from a cool-down: one request at a time until one succeeds

    def summary(self, seconds: float) -> dict:
        return {"rows": self.rows, "completion_tokens": self.completion_tokens,
                "tokens_per_s": round(self.completion_tokens / seconds, 1) if seconds else None,
                "errors": dict(self.errors), "taken_out": self.taken_out}


class ReplicaPool:
    """Hands out replicas least-loaded first and leaves failing ones out for a while (module docstring)."""

    def __init__(self, urls: list[str], per_replica: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic):
        self.replicas = [Replica(u.rstrip("/") + "/") for u in urls]
        self.per_replica, self.cooldown, self.clock = per_replica, cooldown, clock
        self._changed: asyncio.Condition | None = None  # made inside the running event loop

    def _limit(self, r: Replica) -> int:
        return 1 if r.probing else self.per_replica

    def pick(self) -> Replica | None:
        """The replica the next request should go to now, or None when every usable one is full."""
        now = self.clock()
        up = [r for r in self.replicas if r.out_until <= now]
        if not up:  # all are out: the one back soonest still serves, so the run goes on
            up = [min(self.replicas, key=lambda r: r.out_until)]
        free = [r for r in up if r.in_flight < self._limit(r)]
        return min(free, key=lambda r: (r.in_flight, r.rows)) if free else None

    @contextlib.asynccontextmanager
    async def take(self):
        """Wait for a replica with room, count the request in flight on it while the block runs."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            while (replica := self.pick()) is None:
                try:  # a replica's cool-down ending also frees room: look again after a short while
                    await asyncio.wait_for(self._changed.wait(), timeout=min(self.cooldown, 1.0))
                except asyncio.TimeoutError:
                    pass
            replica.in_flight += 1
        try:
            yield replica
        finally:
            async with self._changed:
                replica.in_flight -= 1
                self._changed.notify_all()

    def failed(self, replica: Replica, reason: str, take_out: bool) -> None:
        """Record a failed request; `take_out` (the server is unwell) leaves the replica out for the cool-down."""
        replica.errors[reason] += 1
        if take_out:
            if replica.out_until <= self.clock():
                replica.taken_out += 1
            replica.out_until = self.clock() + self.cooldown
            replica.probing = True

    def succeeded(self, replica: Replica) -> None:
        replica.probing = False
        replica.out_until = 0.0

    def others_up(self, replica: Replica) -> bool:
        """Whether another replica is in now (a failed request can go there at once, without backing off)."""
        now = self.clock()
        return any(r is not replica and r.out_until <= now for r in self.replicas)

    def summary(self, seconds: float) -> dict:
        """Per replica URL: rows, generated tokens, tokens/s over the run, errors by reason, times taken out."""
        return {r.url.rstrip("/"): r.summary(seconds) for r in self.replicas}
