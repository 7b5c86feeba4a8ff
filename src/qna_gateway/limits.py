"""Per-principal and global limits: request rate, running answers, open streams."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import ProblemError, Unavailable


class TooManyRequests(ProblemError):
    """The principal is over one of its limits; `Retry-After` says when to come back."""

    status = 429
    title = "Too many requests"


@dataclass
class RateLimiter:
    """A fixed one-minute window per principal (per process: with N replicas behind a
    round-robin balancer a principal gets about N times the limit)."""

    per_minute: int
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, tuple[int, int]] = field(default_factory=dict)

    def hit(self, principal: str) -> None:
        if self.per_minute <= 0:
            return
        now = self.clock()
        window = int(now // 60)
        start, count = self._windows.get(principal, (window, 0))
        if start != window:
            start, count = window, 0
        reset = max(1, math.ceil((window + 1) * 60 - now))
        if count >= self.per_minute:
            raise TooManyRequests(
                f"{principal} is over {self.per_minute} requests a minute.",
                headers={
                    "Retry-After": str(reset),
                    "RateLimit-Limit": str(self.per_minute),
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(reset),
                    "RateLimit-Policy": f"{self.per_minute};w=60",
                },
            )
        self._windows[principal] = (start, count + 1)
        if len(self._windows) > 100_000:  # old windows of principals gone quiet
            self._windows = {p: w for p, w in self._windows.items() if w[0] == window}


@dataclass
class TokenBudget:
    """Output tokens per principal per minute (per process): an ask is refused while the
    principal's answers of this minute used the budget up."""

    per_minute: int
    clock: Callable[[], float] = time.monotonic
    _used: dict[str, tuple[int, int]] = field(default_factory=dict)

    def check(self, principal: str) -> None:
        if self.per_minute <= 0:
            return
        now = self.clock()
        window = int(now // 60)
        start, used = self._used.get(principal, (window, 0))
        if start == window and used >= self.per_minute:
            reset = max(1, math.ceil((window + 1) * 60 - now))
            raise TooManyRequests(
                f"{principal} used its {self.per_minute} tokens for this minute.",
                headers={
                    "Retry-After": str(reset),
                    "RateLimit-Limit": str(self.per_minute),
                    "RateLimit-Remaining": "0",
                    "RateLimit-Reset": str(reset),
                    "RateLimit-Policy": f'{self.per_minute};w=60;unit="tokens"',
                },
            )

    def spend(self, principal: str, tokens: int) -> None:
        if self.per_minute <= 0:
            return
        window = int(self.clock() // 60)
        start, used = self._used.get(principal, (window, 0))
        self._used[principal] = (window, (used if start == window else 0) + tokens)


@dataclass
class Slots:
    """Counted places (running answers, open streams), per principal and in all."""

    what: str
    per_principal: int
    total: int
    _held: Counter[str] = field(default_factory=Counter)

    def acquire(self, principal: str) -> Callable[[], None]:
        if sum(self._held.values()) >= self.total:
            raise Unavailable(
                f"This gateway has {self.total} {self.what} open, its limit; retry shortly.",
                headers={"Retry-After": "2"},
            )
        if self._held[principal] >= self.per_principal:
            raise TooManyRequests(
                f"{principal} has {self.per_principal} {self.what} open, its limit.",
                headers={"Retry-After": "2"},
            )
        self._held[principal] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._held[principal] -= 1
                if self._held[principal] <= 0:
                    del self._held[principal]

        return release
