"""The event hub on a real PostgreSQL: a follower hears its answer's text channel from the moment
`subscribe` returns, and again after the listener's connection is lost and comes back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from qna_gateway import pubsub
from qna_gateway.events import Resync, StreamEvent, TextAppended, resync_notice, text_notice
from qna_gateway.pubsub import EventHub
from qna_gateway.store import messages as store
from tests.fixtures.db_proxy import DatabaseProxy

Hub = tuple[EventHub, str]  # the hub and its connection's application_name


@pytest.fixture
async def hub(database_url: str) -> AsyncIterator[Hub]:
    name = f"qna-hub-{uuid.uuid4().hex[:12]}"
    hub = EventHub(make_conninfo(database_url, application_name=name), on_cancel=lambda _: None)
    await hub.start()
    yield hub, name
    await hub.stop()


@pytest.fixture
async def proxied(database_url: str) -> AsyncIterator[tuple[EventHub, DatabaseProxy]]:
    """A hub whose connection goes through a proxy the test can cut or stall."""
    proxy = DatabaseProxy(database_url)
    proxy.up()
    hub = EventHub(proxy.url, on_cancel=lambda _: None)
    await hub.start()
    try:
        yield hub, proxy
    finally:
        await hub.stop()
        proxy.close()


async def notify(db: psycopg.AsyncConnection, channel: str, payload: str) -> None:
    await db.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def next_event(queue: asyncio.Queue[StreamEvent]) -> StreamEvent:
    async with asyncio.timeout(5):
        return await queue.get()


async def test_a_follower_hears_its_answers_text_as_soon_as_it_has_subscribed(
    hub: Hub, db: psycopg.AsyncConnection
) -> None:
    events, name = hub
    answer = uuid.uuid4()
    queue = await events.subscribe(answer)
    # No pause: the LISTEN took effect before subscribe() returned.
    await notify(db, store.text_channel(answer), text_notice(answer, 0, "Hello"))
    assert await next_event(queue) == TextAppended(0, "Hello")
    # What is not text still comes on the shared channel.
    await notify(db, store.EVENTS_CHANNEL, resync_notice(answer, 5))
    assert await next_event(queue) == Resync()

    # Followed again after a pause in following: listened to again.
    events.unsubscribe(answer, queue)
    queue = await events.subscribe(answer)
    await notify(db, store.text_channel(answer), text_notice(answer, 5, " again"))
    assert await next_event(queue) == TextAppended(5, " again")
    events.unsubscribe(answer, queue)
    assert events.watched == 0
    # ...and once nobody here follows it, its channel is let go: the listener's last statement.
    async with asyncio.timeout(5):
        while await last_statement(db, name) != f'UNLISTEN "{store.text_channel(answer)}"':
            await asyncio.sleep(0.01)


async def last_statement(db: psycopg.AsyncConnection, application_name: str) -> str | None:
    cur = await db.execute(
        "SELECT query FROM pg_stat_activity WHERE application_name = %s", (application_name,)
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])


async def test_after_a_lost_connection_it_listens_again_to_what_is_followed(
    hub: Hub, db: psycopg.AsyncConnection
) -> None:
    events, name = hub
    answers = [uuid.uuid4() for _ in range(3)]
    queues = [await events.subscribe(answer) for answer in answers]
    cur = await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        (name,),
    )
    assert await cur.fetchall() == [(True,)]
    for queue in queues:  # notices may have been missed meanwhile: every follower re-reads
        assert await next_event(queue) == Resync()
    for answer, queue in zip(answers, queues, strict=True):
        await notify(db, store.text_channel(answer), text_notice(answer, 0, answer.hex))
        assert await next_event(queue) == TextAppended(0, answer.hex)


async def test_a_subscribe_cancelled_while_it_waits_leaves_no_follower(
    hub: Hub, db: psycopg.AsyncConnection
) -> None:
    events, _ = hub
    answer = uuid.uuid4()
    waiting = asyncio.ensure_future(events.subscribe(answer))
    await asyncio.sleep(0)  # registered, its LISTEN not yet sent
    assert events.watched == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert events.watched == 0
    # The hub goes on: another answer is followed as before.
    other = uuid.uuid4()
    queue = await events.subscribe(other)
    await notify(db, store.text_channel(other), text_notice(other, 0, "still here"))
    assert await next_event(queue) == TextAppended(0, "still here")


async def test_stopping_while_it_changes_what_it_listens_to_returns(database_url: str) -> None:
    """Stopped just as a follower leaves, while the listener puts its receiver aside to
    UNLISTEN: the stop's cancellation is not lost in that clean-up (it was, once, and the stop
    waited forever). Each pause, in loop turns, lands the stop at a different step of it."""
    for pause in range(8):
        events = EventHub(database_url, on_cancel=lambda _: None)
        await events.start()
        answer = uuid.uuid4()
        events.unsubscribe(answer, await events.subscribe(answer))
        for _ in range(pause):
            await asyncio.sleep(0)
        # A timeout that cancels the stop would not do: the cancellation it sends is what was
        # swallowed. Waiting for the stop's task leaves it alone.
        stopping = asyncio.ensure_future(events.stop())
        await asyncio.wait((stopping,), timeout=5)
        assert stopping.done(), f"stop() still waits after a pause of {pause} loop turns"


async def test_a_listener_gone_silent_holds_a_subscribe_only_so_long(
    proxied: tuple[EventHub, DatabaseProxy],
    db: psycopg.AsyncConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listener's connection stays open but nothing comes back (a stalled server or
    network): subscribe returns after LISTEN_WAIT_SECONDS rather than with the connection, and
    once the connection speaks again the held LISTEN goes through and the follower hears its
    channel."""
    monkeypatch.setattr(pubsub, "LISTEN_WAIT_SECONDS", 0.3)
    events, proxy = proxied
    proxy.stall()
    answer = uuid.uuid4()
    async with asyncio.timeout(10):  # a guard against hanging, not a limit being tested
        queue = await events.subscribe(answer)
    assert events.watched == 1
    proxy.resume()
    async with asyncio.timeout(10):
        while queue.empty():  # until the LISTEN, delivered late, has been executed
            await notify(db, store.text_channel(answer), text_notice(answer, 0, "late"))
            await asyncio.sleep(0.05)
    assert queue.get_nowait() == TextAppended(0, "late")


async def test_a_subscribe_while_the_listener_is_away_returns_and_the_reconnect_covers_it(
    proxied: tuple[EventHub, DatabaseProxy],
    db: psycopg.AsyncConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the database unreachable, subscribe does not wait for a LISTEN that cannot happen
    (the wait is made long here, so waiting would show as a hang): it returns, and the
    reconnect LISTENs to the new channel and tells the follower to re-read first."""
    monkeypatch.setattr(pubsub, "LISTEN_WAIT_SECONDS", 3600)
    events, proxy = proxied
    earlier = uuid.uuid4()
    before = await events.subscribe(earlier)
    proxy.down()  # every connection cut, and no new one until up()
    async with asyncio.timeout(10):
        while events.connected:
            await asyncio.sleep(0.01)
    answer = uuid.uuid4()
    async with asyncio.timeout(10):  # a guard against hanging, not a limit being tested
        queue = await events.subscribe(answer)
    proxy.up()
    assert await next_event(queue) == Resync()
    assert await next_event(before) == Resync()
    await notify(db, store.text_channel(answer), text_notice(answer, 0, "covered"))
    assert await next_event(queue) == TextAppended(0, "covered")
