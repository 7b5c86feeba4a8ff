"""LISTEN/NOTIFY fan-in: one dedicated connection hears every replica's message notices."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from uuid import UUID

from psycopg import AsyncConnection, OperationalError, sql

from .events import Notice, Resync, StreamEvent, TextAppended, parse_notice
from .store.messages import EVENTS_CHANNEL, text_channel
from .tasks import cancel_and_wait

log = logging.getLogger(__name__)

Subscriber = asyncio.Queue[StreamEvent]

# How long a subscriber waits for the listener to confirm its LISTEN before it goes on without.
LISTEN_WAIT_SECONDS = 5.0


class EventHub:
    """Routes notices to the streams that watch a message owned by another process.

    The listening connection is its own, outside the pool: a pooled connection would go back to
    the pool still listening. When it drops, the hub reconnects with backoff and tells every
    subscriber to re-read the table, since notices sent meanwhile are lost.

    Besides the shared channel it LISTENs to the text channel of each message it has a
    subscriber for, and of no other: the text of answers nobody here follows, this process's
    own included, is not delivered to it at all.
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
        self._connected = False
        # The watched set changed: the listener stops receiving to LISTEN/UNLISTEN the difference.
        self._changed = asyncio.Event()
        self._heard: dict[UUID, list[asyncio.Future[None]]] = {}  # subscribe() waiting on LISTEN

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="qna-event-hub")
        # Wait for the first LISTEN, so a notice sent right after start-up is not missed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def subscribe(self, message_id: UUID) -> Subscriber:
        """A queue of `message_id`'s events, returned once its text channel is listened to, so
        a read of the table after this call misses no text.

        While the listener is away it returns at once: the reconnect listens to every watched
        channel and sends every subscriber a `Resync`. If the listener does not confirm within
        `LISTEN_WAIT_SECONDS` (a connection gone silent), it returns too: the follower's
        periodic re-read carries it meanwhile, as it did before text had channels of its own.
        """
        queue: Subscriber = asyncio.Queue()
        self._subscribers[message_id].add(queue)
        self._changed.set()  # also while away: a reconnect already past its LISTENs redoes them
        if not self._connected:
            return queue
        heard = asyncio.get_running_loop().create_future()
        self._heard.setdefault(message_id, []).append(heard)
        try:
            async with asyncio.timeout(LISTEN_WAIT_SECONDS):
                await heard
        except TimeoutError:
            log.warning(
                "the event listener did not confirm LISTEN for %s within %ss; its stream re-reads"
                " the table until it does",
                message_id,
                LISTEN_WAIT_SECONDS,
            )
        except BaseException:
            self.unsubscribe(message_id, queue)
            raise
        return queue

    def unsubscribe(self, message_id: UUID, queue: Subscriber) -> None:
        watchers = self._subscribers.get(message_id)
        if watchers is not None:
            watchers.discard(queue)
            if not watchers:
                del self._subscribers[message_id]
                self._heard.pop(message_id, None)  # a subscribe() cancelled while it waited
                self._changed.set()

    def broadcast(self, event: StreamEvent) -> None:
        """Send one event to every remote watcher (e.g. Reconnect when draining)."""
        for watchers in self._subscribers.values():
            for queue in watchers:
                queue.put_nowait(event)

    @property
    def connected(self) -> bool:
        """Whether the listener holds a connection now (it reconnects by itself when not)."""
        return self._connected

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
                    listening: set[UUID] = set()
                    await self._listen_to_watched(conn, listening)
                    self._connected = True
                    if self._ready.is_set():
                        self.broadcast(Resync())
                        if self._on_missed is not None:
                            self._on_missed()
                    self._ready.set()
                    delay = 0.2
                    await self._receive(conn, listening)
            except OperationalError as exc:
                log.warning(
                    "event listener lost its connection (%s); retrying in %.1fs", exc, delay
                )
            finally:
                self._connected = False
                self._let_go(self._heard)  # nobody waits while it is away: the reconnect resyncs
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    async def _receive(self, conn: AsyncConnection, listening: set[UUID]) -> None:
        """Dispatch notices until the connection fails. psycopg's `notifies()` holds the
        connection while it waits, so a change of the watched set interrupts the wait (which is
        safe: it has consumed nothing yet) to LISTEN or UNLISTEN, then waits again."""
        while True:
            receiving = asyncio.ensure_future(self._dispatch_all(conn))
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait((receiving, changed), return_when=asyncio.FIRST_COMPLETED)
            finally:
                # Both unwound (the receiver lets go of the connection) whatever their outcome,
                # and without swallowing this task's own cancellation, as awaiting a cancelled
                # task inside `suppress(CancelledError)` would.
                receiving.cancel()
                changed.cancel()
                await asyncio.wait((receiving, changed))
            if not receiving.cancelled() and (error := receiving.exception()) is not None:
                raise error  # the connection failed
            await self._listen_to_watched(conn, listening)

    async def _dispatch_all(self, conn: AsyncConnection) -> None:
        async for notify in conn.notifies():
            self._dispatch(notify.payload)

    async def _listen_to_watched(self, conn: AsyncConnection, listening: set[UUID]) -> None:
        """LISTEN to the text channel of every watched message, UNLISTEN the rest (one round
        trip), then let the subscribers waiting for it go."""
        self._changed.clear()  # a change while this runs sets it again: the next round sees it
        wanted = set(self._subscribers)
        commands = [
            *(
                sql.SQL("LISTEN {}").format(sql.Identifier(text_channel(m)))
                for m in wanted - listening
            ),
            *(
                sql.SQL("UNLISTEN {}").format(sql.Identifier(text_channel(m)))
                for m in listening - wanted
            ),
        ]
        if commands:
            await conn.execute(sql.SQL("; ").join(commands))
            listening.clear()
            listening.update(wanted)
        self._let_go(wanted)

    def _let_go(self, message_ids: Iterable[UUID]) -> None:
        """The subscribe() calls waiting on these messages' LISTEN return."""
        for message_id in list(message_ids):
            for heard in self._heard.pop(message_id, ()):
                if not heard.done():  # not cancelled meanwhile
                    heard.set_result(None)

    def _dispatch(self, payload: str) -> None:
        notice = parse_notice(payload)
        if notice is None:
            log.warning("ignoring a malformed notice")
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
