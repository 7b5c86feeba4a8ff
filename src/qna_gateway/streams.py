"""SSE for one answer: replay what the client missed, then tail the live answer to the end.

An event id is the state the client reaches with that event: `<tag>.<offset>` — it has the
first `offset` characters of the answer — followed by `.t<k>` once it has the first `k` tool
events, and by `.end` on the terminal event. `<tag>` is the first 8 hex digits of the message
id. Reconnecting with one of them yields exactly what comes after that state, whichever
process the client reaches and however far the stored text lags behind what was streamed.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import msgspec

from .errors import BadRequest
from .events import (
    Ended,
    Reconnect,
    StreamEvent,
    TextAppended,
    ToolEventAppended,
    ToolEventRecord,
)
from .schemas import Delta, Message, MessageStarted
from .sse import EventSink
from .store import messages as store
from .store.pool import DB_ERRORS
from .turn_manager import TurnManager
from .turns import Turn

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_ID = re.compile(r"^([0-9a-f]{8})\.(\d{1,9})(?:\.t(\d{1,6}))?(\.end)?$")


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client's Last-Event-ID says it stopped."""

    offset: int
    tools: int = 0
    ended: bool = False


def _tag(message_id: UUID) -> str:
    return message_id.hex[:8]


def event_id(message_id: UUID, offset: int, tools: int = 0, *, end: bool = False) -> str:
    return _event_id(_tag(message_id), offset, tools, end)


def _event_id(tag: str, offset: int, tools: int, end: bool) -> str:
    return f"{tag}.{offset}{f'.t{tools}' if tools else ''}{'.end' if end else ''}"


def parse_position(raw: str | None, message: Message) -> Position | None:
    """Read a Last-Event-ID for this message; 400 when it is not one of its ids."""
    if raw is None or raw == "":
        return None
    match = _ID.match(raw.strip())
    if match is None or match[1] != _tag(message.id):
        raise BadRequest(f"Last-Event-ID {raw[:80]!r} is not an event id of message {message.id}.")
    position = Position(int(match[2]), int(match[3] or 0), ended=match[4] is not None)
    if message.is_terminal and position.offset > len(message.content):
        raise BadRequest(f"Last-Event-ID {raw!r} is past the end of message {message.id}.")
    return position


def sse(event: str, event_id: str, data: bytes) -> bytes:
    return b"".join((f"id: {event_id}\nevent: {event}\ndata: ".encode(), data, b"\n\n"))


def tool_records(raw: list[Any]) -> list[ToolEventRecord]:
    return sorted(msgspec.convert(raw, list[ToolEventRecord]), key=lambda r: r.k)


class _Cursor:
    """What this client has (text offset, tool events): turns what happens into what it lacks
    and emits that, possibly nothing. A `gap` (something happened that the client cannot be
    given in order) makes the caller re-read the stored answer.

    The first event carries the `retry:` hint; a hint alone would make some clients see an
    event without an id.
    """

    def __init__(
        self, message_id: UUID, sink: EventSink, hint: bytes, position: Position | None
    ) -> None:
        self.offset = position.offset if position else 0
        self.tools = position.tools if position else 0
        self.gap = False
        self.ended_with: Literal["terminal", "reconnect"] | None = None  # once sent
        self._emit = sink.emit
        self._hint: bytes | None = hint
        self._tag = _tag(message_id)  # formatting the UUID per event showed in profiles
        self._btag = self._tag.encode()

    def _id(self, *, end: bool = False) -> str:
        return _event_id(self._tag, self.offset, self.tools, end)

    def send(self, chunk: bytes) -> None:
        if self._hint is not None:
            chunk, self._hint = self._hint + chunk, None
        self._emit(chunk)

    def text(self, start: int, text: str) -> None:
        end = start + len(text)
        if start > self.offset:
            self.gap = True
        elif end > self.offset:
            piece = text[self.offset - start :]
            self.offset = end
            if self._hint is not None or self.tools:
                self.send(sse("message.delta", self._id(), _encode(Delta(piece))))
            else:
                # Per token, the usual case: the same bytes as above, four calls fewer.
                self._emit(
                    b"id: %s.%d\nevent: message.delta\ndata: %s\n\n"
                    % (self._btag, end, _encode(Delta(piece)))
                )

    def tool(self, record: ToolEventRecord) -> None:
        if record.k <= self.tools:
            return
        if record.k > self.tools + 1 or record.o > self.offset:
            self.gap = True
            return
        self.tools = record.k
        self.send(sse(record.event, self._id(), _encode(record.data)))

    def catch_up(self, content: str, records: list[ToolEventRecord]) -> None:
        """Everything missed from a snapshot: text and tool events, each in its place."""
        self.gap = False
        for record in records:
            if record.k <= self.tools:
                continue
            if record.o > len(content):  # its text is not stored yet; wait for it
                break
            if record.o > self.offset:
                self.text(self.offset, content[self.offset : record.o])
            self.tool(record)
        if len(content) > self.offset:
            self.text(self.offset, content[self.offset :])
        self.gap = False

    def terminal(self, message: Message) -> None:
        self.offset = max(self.offset, len(message.content))
        self.send(sse(f"message.{message.status}", self._id(end=True), _encode(message)))
        self.ended_with = "terminal"

    def reconnect(self) -> None:
        self.send(sse("reconnect", self._id(), b"{}"))
        self.ended_with = "reconnect"


async def answer_events(
    manager: TurnManager,
    message: Message,
    position: Position | None,
    sink: EventSink,
    *,
    user_message: Message | None = None,
) -> None:
    """Emit the event stream of one assistant message, from `position` to its terminal event,
    and return once the client has it all."""
    metrics = manager.telemetry.metrics
    metrics.open_streams.inc()
    if position is not None:
        metrics.resumes.inc()
    cursor = _Cursor(
        message.id, sink, f"retry: {manager.settings.sse_retry_ms}\n".encode(), position
    )
    sent = False
    try:
        await _events(manager, message, cursor, opening=position is None, user_message=user_message)
        await sink.drained()  # emitted is not yet sent: a client can still stop reading
        sent = True
    finally:
        metrics.open_streams.dec()
        if sent and cursor.ended_with == "reconnect":
            metrics.disconnects.labels("reconnect").inc()
        elif not sent or cursor.ended_with != "terminal":
            metrics.disconnects.labels("client").inc()


async def _events(
    manager: TurnManager,
    message: Message,
    cursor: _Cursor,
    *,
    opening: bool,
    user_message: Message | None,
) -> None:
    if opening:
        started = msgspec.structs.replace(
            message, content="", status="streaming", completed_at=None
        )
        opening_event = MessageStarted(**msgspec.structs.asdict(started), user_message=user_message)
        cursor.send(sse("message.started", event_id(message.id, 0), _encode(opening_event)))

    turn = manager.local(message.id)
    if turn is not None:
        await _tail_local(turn, cursor)
    else:
        await _tail_remote(manager, message, cursor)


async def _tail_local(turn: Turn, cursor: _Cursor) -> None:
    """Follow an answer this process generates: each event goes out as the turn publishes
    it, from the LLM connection's callback or the turn's task (see sse.py)."""
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def listen(event: StreamEvent) -> None:
        if ended.done():
            return
        try:
            if isinstance(event, TextAppended):
                cursor.text(event.start, event.text)
            elif isinstance(event, ToolEventAppended):
                cursor.tool(event.record)
            elif isinstance(event, Ended):
                finish(event.message)
        except Exception as exc:  # the stream's failure, not the answer's
            ended.set_exception(exc)

    def finish(final: Message) -> None:
        cursor.catch_up(final.content, turn.tool_events)
        cursor.terminal(final)
        ended.set_result(None)

    text, records, final, subscription = turn.subscribe(listen)
    try:
        cursor.catch_up(text, records)
        if final is not None:
            finish(final)
        await ended
    finally:
        turn.unsubscribe(subscription)


async def _tail_remote(manager: TurnManager, message: Message, cursor: _Cursor) -> None:
    """Follow an answer that another process generates, through NOTIFY and the table."""
    if manager.draining.is_set():
        # Draining: this process will not be here to follow it; send the client elsewhere
        # (after what it can have now: the stored text may already end the answer).
        async with manager.pool.connection() as conn:
            stored = await store.read_answer(conn, message_id=message.id)
        if stored is not None:
            cursor.catch_up(stored[0].content, tool_records(stored[1]))
            if stored[0].is_terminal:
                cursor.terminal(stored[0])
                return
        cursor.reconnect()
        return
    queue = await manager.hub.subscribe(message.id)
    settings = manager.settings
    # Re-read now and then even without notices: covers a lost notice and an owner that died.
    # The same beat tells the owner this answer is watched (the orphan rule spans replicas).
    beat = min(settings.sse_ping_seconds, max(settings.orphan_seconds / 3, 0.05), 5.0)
    loop = asyncio.get_running_loop()
    last_read = -beat
    try:
        reread = True
        while True:
            if reread or loop.time() - last_read >= beat:
                reread = False
                last_read = loop.time()
                try:
                    async with manager.pool.connection() as conn:
                        stored = await store.read_answer(conn, message_id=message.id)
                        if stored is not None and not stored[0].is_terminal:
                            await store.mark_watched(conn, message_id=message.id)
                except DB_ERRORS as exc:
                    log.warning("stream of %s could not read the table: %s", message.id, exc)
                else:
                    if stored is None:  # the chat was deleted
                        return
                    current, raw_records = stored
                    cursor.catch_up(current.content, tool_records(raw_records))
                    if current.is_terminal:
                        cursor.terminal(current)
                        return
            try:
                event = await asyncio.wait_for(queue.get(), beat)
            except TimeoutError:
                continue
            if isinstance(event, Reconnect):
                cursor.reconnect()
                return
            if isinstance(event, TextAppended):
                cursor.text(event.start, event.text)
                reread = cursor.gap
            else:  # a resync, a tool event, a final status: the table is the truth
                reread = True
    finally:
        manager.hub.unsubscribe(message.id, queue)
