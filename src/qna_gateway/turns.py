"""A turn: one answer being generated, owned by the app rather than by any HTTP connection.

It streams from the answerer and publishes every piece to its in-process subscribers at once;
the process's `TextWriter` stores the text in batches (time- and size-bounded) and announces
each batch with NOTIFY for streams on other replicas. Whoever watches or leaves, the turn ends
exactly once with a stored terminal status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from psycopg import AsyncConnection

from .answers import (
    Answerer,
    AnswerError,
    ChatLine,
    EarlyCall,
    Finished,
    ToolCalled,
    ToolResult,
    UsageReported,
)
from .events import (
    Ended,
    StreamEvent,
    TextAppended,
    ToolEventAppended,
    ToolEventRecord,
    end_notice,
    resync_notice,
    text_notice,
)
from .schemas import Message, Source, Usage
from .store import messages as store
from .store.messages import storable
from .store.pool import DB_ERRORS, NOT_TRANSIENT, Pool
from .telemetry import GenAI, Telemetry, chat_id_var, exemplar_of
from .text_writer import TextWriter
from .tools import SEARCH_TOOL_NAME, search_query_of

log = logging.getLogger(__name__)

# llm_tokens_relayed_total grows by this many at a time while an answer streams (and by the
# rest when it ends).
TOKENS_REPORTED_EVERY = 16

# Called with each event, in order, from the turn's task or the LLM connection's callback
# (text): it must be quick and must not wait.
Listener = Callable[[StreamEvent], None]
StopStatus = Literal["cancelled", "interrupted"]


@dataclass(frozen=True, slots=True)
class TurnConfig:
    orphan_seconds: float
    final_write_seconds: float = 30.0
    log_content: bool = False


class Turn:
    """One running answer. Create it with `TurnManager.start_turn`."""

    def __init__(
        self,
        *,
        message: Message,
        conversation: list[ChatLine],
        answerer: Answerer,
        pool: Pool,
        writer: TextWriter,
        config: TurnConfig,
        telemetry: Telemetry,
        on_done: Callable[[Turn], None],
        early: EarlyCall | None = None,
    ) -> None:
        self.message = message
        self._conversation = conversation
        self._early = early
        self._answerer = answerer
        self._pool = pool
        self._writer = writer
        self._config = config
        self._on_done = on_done
        self._telemetry = telemetry
        self._metrics = telemetry.metrics
        self._started = 0.0
        self._first_text_at: float | None = None
        self._tokens_unreported = 0

        self._parts: list[str] = []
        self._joined = ""
        self._length = 0
        self._flushed = 0
        # Batches, tool-event writes and the final write take turns, so stored offsets stay
        # in order.
        self._write_lock = asyncio.Lock()
        self._tool_events: list[ToolEventRecord] = []
        self._closing = False
        self._span_context: trace.SpanContext | None = None

        self._listeners: dict[object, Listener] = {}
        self._fanout: tuple[Listener, ...] = ()  # the same, ready to iterate per token
        self._orphan_timer: asyncio.TimerHandle | None = None
        self._orphan_check: asyncio.Task[None] | None = None

        self._sources: list[Source] | None = None
        self._usage: Usage | None = None
        self._finish_reason: str | None = None
        self._stop: tuple[StopStatus, str] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self.final: Message | None = None
        # Whether `final` is the row as stored (not the in-memory end told to watchers while
        # the database was away, nor one of a message deleted meanwhile).
        self.final_stored = False
        self.done = asyncio.Event()

    @property
    def id(self) -> UUID:
        return self.message.id

    @property
    def write_lock(self) -> asyncio.Lock:
        return self._write_lock

    @property
    def span_context(self) -> trace.SpanContext | None:
        return self._span_context

    @property
    def tool_events(self) -> list[ToolEventRecord]:
        return list(self._tool_events)

    @property
    def text(self) -> str:
        if len(self._joined) != self._length:
            self._joined = "".join(self._parts)
            self._parts = [self._joined]
        return self._joined

    # -- subscribers -------------------------------------------------------------------------

    def subscribe(
        self, listener: Listener
    ) -> tuple[str, list[ToolEventRecord], Message | None, object]:
        """The text and tool events so far and the final message if ended; `listener` gets
        what comes next. Atomic (no await), so nothing falls between the snapshot and the
        first event. The last item is the subscription, for `unsubscribe`.
        """
        subscription = object()
        self._listeners[subscription] = listener
        self._fanout = tuple(self._listeners.values())
        self._disarm_orphan_timer()
        return self.text, list(self._tool_events), self.final, subscription

    def unsubscribe(self, subscription: object) -> None:
        self._listeners.pop(subscription, None)
        self._fanout = tuple(self._listeners.values())
        if not self._listeners and self.final is None:
            self._arm_orphan_timer()

    @property
    def watchers(self) -> int:
        return len(self._listeners)

    def _publish(self, event: StreamEvent) -> None:
        for listener in self._fanout:
            try:
                listener(event)
            except Exception:
                # A watcher's failure is its own; the answer goes on for the others.
                log.exception("a watcher of answer %s failed", self.id)

    # -- the orphan rule ---------------------------------------------------------------------

    def _arm_orphan_timer(self) -> None:
        self._disarm_orphan_timer()
        loop = asyncio.get_running_loop()
        self._orphan_timer = loop.call_later(self._config.orphan_seconds, self._orphan_timeout)

    def _disarm_orphan_timer(self) -> None:
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None

    def _orphan_timeout(self) -> None:
        self._orphan_timer = None
        if not self._listeners and self.final is None:
            self._orphan_check = asyncio.create_task(self._end_if_unwatched())

    async def _end_if_unwatched(self) -> None:
        """No local watcher for a while; a stream on another replica may still be watching."""
        watched_recently = False
        with contextlib.suppress(*DB_ERRORS):
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT watched_at > now() - make_interval(secs => %s) FROM messages"
                    " WHERE id = %s",
                    (self._config.orphan_seconds, self.id),
                )
                row = await cur.fetchone()
                watched_recently = bool(row and row[0])
        if self._listeners or self.final is not None:
            return
        if watched_recently:
            self._arm_orphan_timer()
        else:
            log.info("answer %s has had no watcher for %.0fs", self.id, self._config.orphan_seconds)
            self.stop("interrupted", "client_gone")

    # -- running -----------------------------------------------------------------------------

    def stop(self, status: StopStatus, reason: str) -> None:
        """End the answer early; the first reason given wins."""
        if self._stop is None and self.final is None:
            self._stop = (status, reason)
            if self._consumer is not None:
                self._consumer.cancel()

    async def run(self) -> None:
        """The whole answer, in one span that is a child of the request that asked."""
        chat_id_var.set(str(self.message.chat_id))  # this task's own context: its log lines
        with self._telemetry.tracer.start_as_current_span(
            "answer",
            attributes={
                "qna.message.id": str(self.id),
                "qna.chat.id": str(self.message.chat_id),
                GenAI.REQUEST_MODEL: self._answerer.model,
            },
            # An early LLM call began the answer before this task did.
            start_time=self._early.started_ns if self._early else None,
        ) as span:
            self._span_context = span.get_span_context()
            await self._run()
            assert self.final is not None
            span.set_attribute("qna.message.status", self.final.status)
            span.set_attribute("qna.message.chars", len(self.final.content))
            if self.final.status == "failed":
                span.set_status(Status(StatusCode.ERROR, self.final.error or "failed"))

    async def _run(self) -> None:
        self._started = self._early.started if self._early else time.monotonic()
        if not self._listeners:
            self._arm_orphan_timer()
        status, finish_reason, error = "completed", "stop", None
        self._consumer = asyncio.create_task(self._consume(), name=f"answer-{self.id}")
        if self._stop is not None:
            self._consumer.cancel()
        try:
            await self._consumer
            finish_reason = self._finish_reason or "stop"
        except asyncio.CancelledError:
            # No stop reason: the turn task itself was cancelled, i.e. the process is exiting.
            stop = self._stop or ("interrupted", "shutdown")
            self._stop = stop
            status, finish_reason = stop
        except AnswerError as exc:
            if exc.timeout:
                status, finish_reason = "interrupted", exc.kind
            else:
                status, finish_reason = "failed", "error"
            error = str(exc)
        except Exception as exc:
            log.exception("answer %s failed", self.id)
            status, finish_reason, error = (
                "failed",
                "error",
                f"internal error: {type(exc).__name__}",
            )
        finally:
            if self._early is not None:
                self._early.abandon()  # stopped before the answerer took it
            # No more batches: the final write stores the whole text. A batch being written
            # finishes first (the final write takes the lock after it).
            self._closing = True
            self._report_tokens()
            self._writer.forget(self)
            self._disarm_orphan_timer()
        async with self._write_lock:
            await self._finish(status, finish_reason, error)

    async def _consume(self) -> None:
        async for event in self._answerer.answer(self._conversation, self._on_text, self._early):
            if isinstance(event, ToolCalled):
                await self._tool_event("tool.call", _call_data(event))
            elif isinstance(event, ToolResult):
                found = self._sources if self._sources is not None else []
                known = {(s.document, s.chunk) for s in found}
                found += [s for s in event.sources if (s.document, s.chunk) not in known]
                self._sources = found
                data: dict[str, object] = {
                    "id": event.call_id,
                    "sources": msgspec.to_builtins(event.sources),
                }
                if event.error is not None:
                    data["error"] = event.error
                await self._tool_event("tool.result", data)
            elif isinstance(event, UsageReported):
                self._usage = event.usage
            elif isinstance(event, Finished):
                self._finish_reason = event.reason

    def _on_text(self, text: str) -> None:
        """The answerer's text sink: called as each piece arrives, possibly from the LLM
        connection's callback (and sse.py's emit writes it to the clients from there too)."""
        if "\x00" in text:  # cleaned here, so watchers get exactly the text that is stored
            text = storable(text)
        if self._first_text_at is None:
            self._first_text_at = time.monotonic()
            # Not the current span: this may run in a network callback's context.
            self._metrics.time_to_first_token.observe(
                self._first_text_at - self._started, exemplar_of(self._span_context)
            )
        # Counted in steps: a Prometheus counter's inc() per token showed in profiles.
        self._tokens_unreported += 1
        if self._tokens_unreported >= TOKENS_REPORTED_EVERY:
            self._report_tokens()
        start = self._length
        self._parts.append(text)
        self._length += len(text)
        self._publish(TextAppended(start, text))
        self._writer.mark(self, self._length - self._flushed)

    def _report_tokens(self) -> None:
        if self._tokens_unreported:
            self._metrics.tokens_relayed.inc(self._tokens_unreported)
            self._tokens_unreported = 0

    async def _tool_event(self, name: str, data: dict[str, object]) -> None:
        record = ToolEventRecord(
            k=len(self._tool_events) + 1, o=self._length, event=name, data=storable(data)
        )
        self._tool_events.append(record)
        self._publish(ToolEventAppended(record))
        # Store the text before the event, then the event, so a replay elsewhere puts it in
        # place. A failure is logged; the final write stores every event again.
        async with self._write_lock:
            await self._flush_unlocked()
            with contextlib.suppress(*DB_ERRORS):
                async with self._pool.connection() as conn:
                    self._metrics.db_statements.labels("tool_event").inc()
                    await store.append_tool_event(
                        conn,
                        message_id=self.id,
                        record=msgspec.to_builtins(record),
                        notify=resync_notice(self.id, self._flushed),
                    )

    # -- persistence -------------------------------------------------------------------------

    def pending(self) -> tuple[int, str] | None:
        """For the writer: the offset and text not stored yet."""
        if self._closing or self._length == self._flushed:
            return None
        return self._flushed, self.text[self._flushed :]

    def stored(self, end: int) -> None:
        self._flushed = max(self._flushed, end)

    async def not_applied(self) -> None:
        """A batch found the stored text elsewhere than expected: store the whole text."""
        async with self._pool.connection() as conn:
            await self._rewrite(conn, self._length)

    async def _flush_unlocked(self) -> None:
        """Store the text so far now (before a tool event), with the write lock held."""
        start, end = self._flushed, self._length
        if end == start:
            return
        batch = self.text[start:end]
        try:
            async with self._pool.connection() as conn:
                self._metrics.db_statements.labels("append").inc()
                ok = await store.append_text(
                    conn,
                    message_id=self.id,
                    offset=start,
                    text=batch,
                    notify=text_notice(self.id, start, batch),
                )
                if ok:
                    self._flushed = end
                else:
                    await self._rewrite(conn, end)
        except DB_ERRORS as exc:
            # Keep the text in memory; the writer's next round (or the final write) retries.
            log.warning("could not store text of answer %s yet: %s", self.id, exc)
            self._writer.mark(self, end - self._flushed)

    async def _rewrite(self, conn: AsyncConnection, end: int) -> None:
        self._metrics.db_statements.labels("rewrite").inc()
        ok = await store.rewrite_text(
            conn, message_id=self.id, text=self.text[:end], notify=text_notice(self.id, 0, "")
        )
        if ok:
            self._flushed = end
        else:
            log.info("answer %s was ended or deleted elsewhere; stopping", self.id)
            self.stop("cancelled", "cancelled")

    async def _finish(self, status: str, finish_reason: str, error: str | None) -> None:
        """Store the end, retrying while the database is away. Past `final_write_seconds` the
        watchers are told the answer `failed` (its text kept) and the same is stored whenever
        the database is back: the answer is never silently dropped."""
        text = self.text
        error = storable(error)
        deadline = time.monotonic() + self._config.final_write_seconds
        delay = 0.1
        with_tool_events = True
        while True:
            try:
                stored = await self._write_end(
                    text, status, finish_reason, error, with_tool_events=with_tool_events
                )
                break
            except DB_ERRORS as exc:
                if isinstance(exc, NOT_TRANSIENT) and with_tool_events:
                    # Waiting will not help: store the end without the tool events (the only
                    # part not already cleaned of what PostgreSQL refuses), and say so.
                    log.error("the end of answer %s cannot be stored whole: %s", self.id, exc)
                    status, finish_reason, with_tool_events = "failed", "error", False
                    error = storable(f"The answer could not be stored whole: {exc}")
                    continue
                if self.final is None and time.monotonic() > deadline:
                    log.error("could not store the end of answer %s yet: %s", self.id, exc)
                    status, finish_reason = "failed", "error"
                    error = (
                        "The database could not be reached when the answer ended; its text "
                        "was kept and is stored once the database is back."
                    )
                    self._announce(self._in_memory(text, status, finish_reason, error))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.final_stored = stored is not None and self.final is None
        stored = stored or self._in_memory(text, status, finish_reason, error)
        if self._config.log_content:
            log.info("answer %s text: %s", self.id, text, extra={"content": text})
        log.info(
            "answer %s ended %s (%s), %d chars", self.id, stored.status, finish_reason, len(text)
        )
        if self.final is None:
            self._announce(stored)

    async def _write_end(
        self,
        text: str,
        status: str,
        finish_reason: str,
        error: str | None,
        *,
        with_tool_events: bool = True,
    ) -> Message | None:
        async with self._pool.connection() as conn:
            self._metrics.db_statements.labels("finish").inc()
            stored = await store.finish_message(
                conn,
                message_id=self.id,
                text=text,
                status=status,
                finish_reason=finish_reason,
                error=error,
                usage=self._usage,
                sources=self._sources,
                tool_events=msgspec.to_builtins(self._tool_events) if with_tool_events else None,
                notify=end_notice(self.id, status, chat_id=self.message.chat_id),
            )
            if stored is None:  # ended elsewhere (a remote cancel) or deleted
                stored = await store.read_message(conn, message_id=self.id)
        return stored

    def _in_memory(self, text: str, status: str, finish_reason: str, error: str | None) -> Message:
        return msgspec.structs.replace(
            self.message,
            content=text,
            status=status,
            finish_reason=finish_reason,
            error=error,
            usage=self._usage,
            sources=self._sources,
        )

    def _announce(self, final: Message) -> None:
        self.final = final
        self._metrics.turns.labels(final.status).inc()
        self._publish(Ended(final))
        self.done.set()
        self._on_done(self)


def _call_data(event: ToolCalled) -> dict[str, object]:
    data: dict[str, object] = {
        "id": event.call_id,
        "name": event.name,
        "arguments": event.arguments,
    }
    if event.name == SEARCH_TOOL_NAME:
        with contextlib.suppress(ValueError):
            data["query"] = search_query_of(event.arguments)
    return data
