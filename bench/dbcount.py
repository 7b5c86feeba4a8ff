"""Commits and statements per benchmark window, from the bench database's cumulative counters."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

from bench.stack import BenchDatabase, DbCounters

# PostgreSQL (15+) may hold an idle backend's counters back for up to 10 s before they show in
# pg_stat_database; a snapshot this long after the last activity is complete.
SETTLE_SECONDS: Final = 11.0


@dataclass(frozen=True, slots=True)
class Opened:
    counters: DbCounters
    at: float


class DbAccounting:
    """Window intervals and the idle background between them.

    A window's interval opens with a settled snapshot just before it and closes with one
    taken, in the background, once the counters have settled after it (the other systems'
    windows run meanwhile, and the gateway idles). The time from one window's close to the
    next window's open is idle: what the database counts then (heartbeats, autovacuum) is
    the background rate the report subtracts.
    """

    def __init__(self, db: BenchDatabase) -> None:
        self.db = db
        self.idle = {"seconds": 0.0, "commits": 0.0, "statements": 0.0}
        self._last_activity = 0.0
        self._idle_from: Opened | None = None
        self._closing: asyncio.Task[None] | None = None

    def activity(self) -> None:
        """The gateway has just used the database (a window, creating chats)."""
        self._last_activity = time.monotonic()

    async def settled(self) -> DbCounters:
        wait = self._last_activity + SETTLE_SECONDS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        return await self.db.counters()

    async def start_idle(self) -> None:
        self._idle_from = Opened(await self.settled(), time.monotonic())

    async def forget_idle(self) -> None:
        """What happens next is not background (e.g. creating more chats)."""
        await self.wait_closed()
        self._idle_from = None

    async def open(self) -> Opened:
        await self.wait_closed()
        opened = Opened(await self.settled(), time.monotonic())
        if self._idle_from is not None:
            self._add_idle(self._idle_from, opened)
            self._idle_from = None
        return opened

    def close_later(self, opened: Opened, into: dict[str, float]) -> None:
        """Fill `into` with the interval's deltas once they have settled."""
        self._closing = asyncio.create_task(self._close(opened, into))

    async def wait_closed(self) -> None:
        if self._closing is not None:
            await self._closing
            self._closing = None

    async def _close(self, opened: Opened, into: dict[str, float]) -> None:
        after = await self.settled()
        now = time.monotonic()
        before = opened.counters
        own = _own(after)
        into.update(
            commits=after.commits - before.commits - own,
            rollbacks=after.rollbacks - before.rollbacks,
            inserted=after.inserted - before.inserted,
            updated=after.updated - before.updated,
            seconds=now - opened.at,
        )
        if after.statements is not None and before.statements is not None:
            into["statements"] = after.statements - before.statements - own
        self._idle_from = Opened(after, now)

    def _add_idle(self, start: Opened, end: Opened) -> None:
        own = _own(end.counters)
        self.idle["seconds"] += end.at - start.at
        self.idle["commits"] += end.counters.commits - start.counters.commits - own
        if end.counters.statements is not None and start.counters.statements is not None:
            self.idle["statements"] += end.counters.statements - start.counters.statements - own


def _own(counters: DbCounters) -> int:
    # Counting pg_stat_statements is itself one statement and one commit in the bench database.
    return 1 if counters.statements is not None else 0
