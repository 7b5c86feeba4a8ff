"""The process's one writer of streamed text: every running answer's new text, one statement
per interval.

A turn marks itself dirty on each delta. Every `interval` (sooner once some answer has
`max_chars` waiting) the writer takes the dirty turns that are not busy with a write of their
own (a tool event, the final write), appends each one's batch at its offset in a single
`UPDATE … FROM unnest(…)` that also NOTIFYs every batch for streams on other replicas, and
hands back to its turn any batch that did not apply. One statement per interval for the whole
process, instead of one per answer, is what keeps PostgreSQL and the pool off the hot path
when hundreds of answers stream at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from typing import Protocol
from uuid import UUID

from opentelemetry import trace

from .metrics import Metrics
from .store import messages as store
from .store.pool import DB_ERRORS, Pool
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)


class Writable(Protocol):
    """What the writer needs of a turn (see `Turn`)."""

    @property
    def id(self) -> UUID: ...

    @property
    def write_lock(self) -> asyncio.Lock: ...

    @property
    def span_context(self) -> trace.SpanContext | None: ...

    def pending(self) -> tuple[int, str] | None:
        """The offset and text not stored yet, or None."""

    def stored(self, end: int) -> None:
        """The text up to `end` is stored."""

    async def not_applied(self) -> None:
        """The stored text was not where the batch expected it (called with the lock held)."""


class TextWriter:
    def __init__(
        self,
        pool: Pool,
        *,
        interval: float,
        max_chars: int,
        metrics: Metrics,
        tracer: trace.Tracer,
    ) -> None:
        self._pool = pool
        self._interval = interval
        self._max_chars = max_chars
        self._metrics = metrics
        self._tracer = tracer
        # Keyed by the turn object itself: a UUID's hash is computed in Python, per delta.
        self._dirty: dict[int, Writable] = {}
        self._wake = asyncio.Event()
        self._woken = False  # _wake is set: mark() need not set it again (a call per token)
        self._full = asyncio.Event()
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def start(self) -> None:
        # A context of its own: the writer serves every request, so it belongs to none of
        # their traces (each batch's span links to the answers it wrote instead).
        self._task = asyncio.create_task(
            self._run(), name="qna-text-writer", context=contextvars.Context()
        )

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def mark(self, turn: Writable, waiting: int) -> None:
        """`turn` has `waiting` characters not stored yet. Called per delta: keep it cheap."""
        self._dirty[id(turn)] = turn
        if not self._woken:
            self._woken = True
            self._wake.set()
        if waiting >= self._max_chars:
            self._full.set()

    def forget(self, turn: Writable) -> None:
        """The turn writes its own end; nothing more to do for it here."""
        self._dirty.pop(id(turn), None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            wait = self._last + self._interval - loop.time()
            if wait > 0 and not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), wait)
            self._wake.clear()
            self._woken = False
            self._full.clear()
            self._last = loop.time()
            try:
                await self.write_dirty()
            except Exception:
                # One writer serves every answer: whatever went wrong, it must go on (the
                # text stays in memory and the final writes store it).
                log.exception("the text writer's round failed")

    async def write_dirty(self) -> None:
        """One statement for every dirty turn that is free to write now."""
        dirty, self._dirty = self._dirty, {}
        taken: list[tuple[Writable, int, int, str]] = []
        try:
            for turn in dirty.values():
                if turn.write_lock.locked():  # its own write runs; the next round takes it
                    self._dirty.setdefault(id(turn), turn)
                    continue
                await turn.write_lock.acquire()  # free, so this returns at once
                batch = turn.pending()
                if batch is None:
                    turn.write_lock.release()
                    continue
                taken.append((turn, batch[0], batch[0] + len(batch[1]), batch[1]))
            if taken:
                await self._write(taken)
        finally:
            for turn, *_ in taken:
                turn.write_lock.release()

    async def _write(self, taken: list[tuple[Writable, int, int, str]]) -> None:
        links = [trace.Link(c) for turn, *_ in taken if (c := turn.span_context) is not None]
        with self._tracer.start_as_current_span(
            "append text", links=links, attributes={"qna.batch.answers": len(taken)}
        ):
            try:
                async with self._pool.connection() as conn:
                    self._metrics.db_statements.labels("append").inc()
                    applied = await store.append_batches(
                        conn,
                        [store.TextBatch(turn.id, start, text) for turn, start, _, text in taken],
                    )
                missed = []
                for turn, _, end, _ in taken:
                    if turn.id in applied:
                        turn.stored(end)
                    else:
                        missed.append(turn)
                for turn in missed:
                    await turn.not_applied()
            except DB_ERRORS as exc:
                # The text stays in memory; the next round (or the final write) tries again.
                if not self._failing:
                    log.warning("could not store streamed text yet: %s", exc)
                self._failing = True
                for turn, *_ in taken:
                    self._dirty.setdefault(id(turn), turn)
                self._woken = True
                self._wake.set()
                return
        if self._failing:
            log.info("storing streamed text again")
        self._failing = False
