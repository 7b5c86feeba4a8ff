"""LISTEN/NOTIFY fan-in: one dedicated connection hears every replica's message notices."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Callable
from uuid import UUID

from psycopg import AsyncConnection, OperationalError

from .events import Notice, Resync, StreamEvent, TextAppended, parse_notice
from .store.messages import EVENTS_CHANNEL
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

Subscriber = asyncio.Queue[StreamEvent]


class EventHub:
    """Routes notices to the streams that watch a message owned by another process.

    The listening connection is its own, outside the pool: a pooled connection would go back to
    the pool still listening. When it drops, the hub reconnects with backoff and tells every
    subscriber to re-read the table, since notices sent meanwhile are lost.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        on_cancel: Callable[[UUID], None],
        on_end: Callable[[UUID, UUID], None] | None = None,
        on_chat_deleted: Callable[[UUID], None] | None = None,
        on_missed: Callable[[], None] | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._on_cancel = on_cancel
        self._on_end = on_end  # (chat id, message id) of an answer that ended, here or not
        self._on_chat_deleted = on_chat_deleted  # a chat deleted, here or not
        self._on_missed = on_missed  # notices may have been lost while the listener was away
        self._subscribers: defaultdict[UUID, set[Subscriber]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="qna-event-hub")
        # Wait for the first LISTEN, so a notice sent right after start-up is not missed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def subscribe(self, message_id: UUID) -> Subscriber:
        queue: Subscriber = asyncio.Queue()
        self._subscribers[message_id].add(queue)
        return queue

    def unsubscribe(self, message_id: UUID, queue: Subscriber) -> None:
        watchers = self._subscribers.get(message_id)
        if watchers is not None:
            watchers.discard(queue)
            if not watchers:
                del self._subscribers[message_id]

    def broadcast(self, event: StreamEvent) -> None:
        """Send one event to every remote watcher (e.g. Reconnect when draining)."""
        for watchers in self._subscribers.values():
            for queue in watchers:
                queue.put_nowait(event)

    @property
    def watched(self) -> int:
        return sum(len(w) for w in self._subscribers.values())

    async def _listen_forever(self) -> None:
        delay = 0.2
        while True:
            try:
                conn = await AsyncConnection.connect(self._conninfo, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    if self._ready.is_set():
                        self.broadcast(Resync())
                        if self._on_missed is not None:
                            self._on_missed()
                    self._ready.set()
                    delay = 0.2
                    async for notify in conn.notifies():
                        self._dispatch(notify.payload)
            except OperationalError as exc:
                log.warning(
                    "event listener lost its connection (%s); retrying in %.1fs", exc, delay
                )
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    def _dispatch(self, payload: str) -> None:
        notice = parse_notice(payload)
        if notice is None:
            log.warning("ignoring a malformed notice on %s", EVENTS_CHANNEL)
            return
        try:
            message_id = UUID(notice.m)
        except ValueError:
            return
        if notice.c:
            self._on_cancel(message_id)
            return
        if notice.d:
            if self._on_chat_deleted is not None:
                self._on_chat_deleted(message_id)
            return
        if notice.h is not None and self._on_end is not None:
            try:
                chat_id = UUID(notice.h)
            except ValueError:
                pass
            else:
                self._on_end(chat_id, message_id)
        watchers = self._subscribers.get(message_id)
        if not watchers:
            return
        event = _event_of(notice)
        for queue in watchers:
            queue.put_nowait(event)


def _event_of(notice: Notice) -> StreamEvent:
    if notice.o is not None and notice.t is not None:
        return TextAppended(notice.o, notice.t)
    # A final status or a text batch too big for the payload: the table has the facts.
    return Resync()
