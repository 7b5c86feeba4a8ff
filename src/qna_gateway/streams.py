"""SSE for one answer: replay what the client missed, then tail the live text to the end.

Event ids carry the answer's character offset: `<tag>.<offset>`, and `<tag>.<offset>.end` on
the terminal event, where `<tag>` is the first 8 hex digits of the message id. A client that
reconnects with one of them gets exactly the text after that offset, whichever replica it
reaches and however far the stored text lags behind what was streamed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

import msgspec

from .errors import BadRequest
from .events import Ended, Reconnect, TextAppended
from .schemas import Delta, Message, MessageStarted
from .store import messages as store
from .turn_manager import TurnManager
from .turns import DB_ERRORS

log = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client's Last-Event-ID says it stopped."""

    offset: int
    ended: bool = False


def _tag(message_id: UUID) -> str:
    return message_id.hex[:8]


def event_id(message_id: UUID, offset: int, *, end: bool = False) -> str:
    return f"{_tag(message_id)}.{offset}{'.end' if end else ''}"


def parse_position(raw: str | None, message: Message) -> Position | None:
    """Read a Last-Event-ID for this message; 400 when it is not one of its ids."""
    if raw is None or raw == "":
        return None
    parts = raw.strip().split(".")
    valid = (
        len(parts) in (2, 3)
        and parts[0] == _tag(message.id)
        and parts[1].isdigit()
        and len(parts[1]) <= 9
        and (len(parts) == 2 or parts[2] == "end")
    )
    if not valid:
        raise BadRequest(f"Last-Event-ID {raw[:80]!r} is not an event id of message {message.id}.")
    position = Position(int(parts[1]), ended=len(parts) == 3)
    if message.is_terminal and position.offset > len(message.content):
        raise BadRequest(f"Last-Event-ID {raw!r} is past the end of message {message.id}.")
    return position


def sse(event: str, event_id: str, data: bytes) -> bytes:
    return b"".join((f"id: {event_id}\nevent: {event}\ndata: ".encode(), data, b"\n\n"))


def terminal_event_name(message: Message) -> str:
    return f"message.{message.status}"


class _Cursor:
    """How much of the answer this client has; turns text events into what it lacks."""

    def __init__(self, message_id: UUID, offset: int) -> None:
        self.message_id = message_id
        self.offset = offset

    def text_event(self, start: int, text: str) -> bytes | None:
        end = start + len(text)
        if end <= self.offset or start > self.offset:
            return None
        piece = text[self.offset - start :]
        self.offset = end
        return sse("message.delta", event_id(self.message_id, end), _encode(Delta(piece)))

    def catch_up(self, content: str) -> bytes | None:
        return self.text_event(0, content) if len(content) > self.offset else None

    def gap_after(self, event: TextAppended) -> bool:
        return event.start > self.offset

    def terminal(self, message: Message) -> bytes:
        return sse(
            terminal_event_name(message),
            event_id(self.message_id, max(self.offset, len(message.content)), end=True),
            _encode(message),
        )

    def reconnect(self) -> bytes:
        return sse("reconnect", event_id(self.message_id, self.offset), b"{}")


async def answer_events(
    manager: TurnManager,
    message: Message,
    position: Position | None,
    *,
    user_message: Message | None = None,
) -> AsyncIterator[bytes]:
    """The event stream of one assistant message, from `position` to its terminal event.

    The first event carries the `retry:` hint; a hint alone would make some clients see an
    event without an id.
    """
    hint = f"retry: {manager.settings.sse_retry_ms}\n".encode()
    async for index, chunk in _enumerate(_events(manager, message, position, user_message)):
        yield hint + chunk if index == 0 else chunk


async def _enumerate(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    index = 0
    async for chunk in chunks:
        yield index, chunk
        index += 1


async def _events(
    manager: TurnManager,
    message: Message,
    position: Position | None,
    user_message: Message | None,
) -> AsyncIterator[bytes]:
    cursor = _Cursor(message.id, position.offset if position else 0)
    if position is None:
        started = msgspec.structs.replace(
            message, content="", status="streaming", completed_at=None
        )
        opening = MessageStarted(**msgspec.structs.asdict(started), user_message=user_message)
        yield sse("message.started", event_id(message.id, 0), _encode(opening))

    turn = manager.local(message.id)
    if turn is not None:
        text, final, queue = turn.subscribe()
        try:
            if (chunk := cursor.catch_up(text)) is not None:
                yield chunk
            cursor.offset = max(cursor.offset, len(text))
            while final is None:
                event = await queue.get()
                if isinstance(event, TextAppended):
                    if (chunk := cursor.text_event(event.start, event.text)) is not None:
                        yield chunk
                elif isinstance(event, Ended):
                    final = event.message
            if (chunk := cursor.catch_up(final.content)) is not None:
                yield chunk
            yield cursor.terminal(final)
        finally:
            turn.unsubscribe(queue)
        return

    async for chunk in _tail_remote(manager, message, cursor):
        yield chunk


async def _tail_remote(
    manager: TurnManager, message: Message, cursor: _Cursor
) -> AsyncIterator[bytes]:
    """Follow an answer that another process generates, through NOTIFY and the table."""
    queue = manager.hub.subscribe(message.id)
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
                        current = await store.read_message(conn, message_id=message.id)
                        if current is not None and not current.is_terminal:
                            await store.mark_watched(conn, message_id=message.id)
                except DB_ERRORS as exc:
                    log.warning("stream of %s could not read the table: %s", message.id, exc)
                else:
                    if current is None:  # the chat was deleted
                        return
                    if (chunk := cursor.catch_up(current.content)) is not None:
                        yield chunk
                    if current.is_terminal:
                        yield cursor.terminal(current)
                        return
            try:
                event = await asyncio.wait_for(queue.get(), beat)
            except TimeoutError:
                continue
            if isinstance(event, Reconnect):
                yield cursor.reconnect()
                return
            if isinstance(event, TextAppended) and not cursor.gap_after(event):
                if (chunk := cursor.text_event(event.start, event.text)) is not None:
                    yield chunk
            else:  # a resync, a final status or a gap: the table is the truth
                reread = True
    finally:
        manager.hub.unsubscribe(message.id, queue)
