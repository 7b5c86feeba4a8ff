"""The text writer: every running answer's new text in one statement, announced per answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import psycopg
import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from qna_gateway.events import MAX_NOTIFY_BYTES, Notice, parse_notice, text_notice
from qna_gateway.metrics import create_metrics
from qna_gateway.store import messages as store
from qna_gateway.store.migrations import apply_migrations
from qna_gateway.store.pool import Pool, make_pool
from qna_gateway.text_writer import TextWriter
from tests.fixtures.db_proxy import DatabaseProxy


class FakeTurn:
    """Stands in for a Turn: text in memory, the part not stored yet, and what the writer did."""

    def __init__(self, message_id: UUID) -> None:
        self._id = message_id
        self._lock = asyncio.Lock()
        self.text = ""
        self.flushed = 0
        self.missed = 0

    @property
    def id(self) -> UUID:
        return self._id

    @property
    def write_lock(self) -> asyncio.Lock:
        return self._lock

    @property
    def span_context(self) -> trace.SpanContext | None:
        return None

    def pending(self) -> tuple[int, str] | None:
        if self.flushed == len(self.text):
            return None
        return self.flushed, self.text[self.flushed :]

    def stored(self, end: int) -> None:
        self.flushed = end

    async def not_applied(self) -> None:
        self.missed += 1


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Pool]:
    await apply_migrations(database_url)
    pool = make_pool(database_url, min_size=1, max_size=2, timeout=5)
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


def new_writer(pool: Pool, registry: CollectorRegistry | None = None) -> TextWriter:
    """A writer that only writes when the test says (`write_dirty`): its interval is long."""
    return TextWriter(
        pool,
        interval=60,
        max_chars=10_000,
        metrics=create_metrics(registry or CollectorRegistry()),
        tracer=trace.NoOpTracer(),
    )


async def streaming_answer(conn: psycopg.AsyncConnection) -> UUID:
    chat_id = uuid4()
    await conn.execute("INSERT INTO chats (id, principal) VALUES (%s, 'writer-test')", (chat_id,))
    _, answer, _ = await store.insert_exchange(
        conn,
        principal="writer-test",
        chat_id=chat_id,
        content="q",
        model="m",
        owner_id=uuid4(),
        history_chars=0,
    )
    return answer.id


async def content_of(conn: psycopg.AsyncConnection, message_id: UUID) -> str:
    cur = await conn.execute("SELECT content FROM messages WHERE id = %s", (message_id,))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def test_one_statement_stores_every_answer_and_announces_each_on_its_own_channel(
    pool: Pool, database_url: str
) -> None:
    registry = CollectorRegistry()
    writer = new_writer(pool, registry)

    def appends() -> float | None:
        return registry.get_sample_value("db_statements_total", {"kind": "append"})

    async with pool.connection() as conn:
        turns = [FakeTurn(await streaming_answer(conn)) for _ in range(3)]
    # A replica following the first two answers (and the shared channel, as every one does).
    listener = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    await listener.execute(f"LISTEN {store.EVENTS_CHANNEL}")
    for turn in turns[:2]:
        await listener.execute(f"LISTEN {store.text_channel(turn.id)}")

    for i, turn in enumerate(turns):
        turn.text = f"answer {i}: first part. "
        writer.mark(turn, len(turn.text))
    await writer.write_dirty()
    assert appends() == 1  # one for all three

    # Notices arrive in commit order, so one sent after the batch comes after all of its own
    # that this listener gets: the third answer's, on a channel nobody listens to, is not one.
    async with pool.connection() as conn:
        await store.notify(conn, payload="sent after the batch")
    received = []
    async with asyncio.timeout(5):
        async for notify in listener.notifies():
            if notify.payload == "sent after the batch":
                break
            notice = parse_notice(notify.payload)
            assert notice is not None
            received.append((notify.channel, notice.m, notice.o, notice.t))
    await listener.close()
    assert sorted(received) == sorted(
        (store.text_channel(t.id), str(t.id), 0, t.text) for t in turns[:2]
    )

    # Next round: more text on two of them; one was changed behind the writer's back, so its
    # batch does not apply and goes back to its turn.
    turns[0].text += "second part."
    turns[1].text += "second part."
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE messages SET content = content || 'x' WHERE id = %s", (turns[1].id,)
        )
    for turn in turns:
        writer.mark(turn, len(turn.text) - turn.flushed)
    await writer.write_dirty()

    async with pool.connection() as conn:
        assert await content_of(conn, turns[0].id) == "answer 0: first part. second part."
        assert await content_of(conn, turns[1].id) == "answer 1: first part. x"
        assert await content_of(conn, turns[2].id) == "answer 2: first part. "
    assert [t.missed for t in turns] == [0, 1, 0]
    assert turns[0].flushed == len(turns[0].text)
    assert turns[1].flushed < len(turns[1].text)
    assert appends() == 2


async def test_a_turn_busy_with_its_own_write_waits_for_the_next_round(pool: Pool) -> None:
    writer = new_writer(pool)
    async with pool.connection() as conn:
        busy, free = FakeTurn(await streaming_answer(conn)), FakeTurn(await streaming_answer(conn))
    for turn in (busy, free):
        turn.text = "some text"
        writer.mark(turn, len(turn.text))
    async with busy.write_lock:
        await writer.write_dirty()
    assert (busy.flushed, free.flushed) == (0, len("some text"))
    await writer.write_dirty()  # still dirty: taken now
    assert busy.flushed == len("some text")
    async with pool.connection() as conn:
        assert await content_of(conn, busy.id) == "some text"


async def test_database_away_keeps_the_text_for_the_next_round(
    pool: Pool, database_url: str
) -> None:
    proxy = DatabaseProxy(database_url)
    proxy.up()
    via_proxy = make_pool(proxy.url, min_size=1, max_size=1, timeout=2)
    await via_proxy.open(wait=True)
    try:
        writer = new_writer(via_proxy)
        async with pool.connection() as conn:
            turn = FakeTurn(await streaming_answer(conn))
        turn.text = "kept"
        writer.mark(turn, 4)
        proxy.down()  # every connection cut
        await writer.write_dirty()
        assert turn.flushed == 0
        proxy.up()
        async with asyncio.timeout(10):
            while turn.flushed == 0:  # the pool reconnects in the background
                await writer.write_dirty()
                await asyncio.sleep(0.1)
        async with pool.connection() as conn:
            assert await content_of(conn, turn.id) == "kept"
    finally:
        await via_proxy.close()
        proxy.close()


async def test_a_connection_the_server_closed_is_replaced_at_checkout(database_url: str) -> None:
    """The pool's check costs no round trip, yet a connection the server ended is not handed
    out (the statement on it would fail)."""
    pool = make_pool(database_url, min_size=1, max_size=1, timeout=5)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            pid = conn.info.backend_pid
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            async with asyncio.timeout(5):  # until the server has really ended it
                while await (
                    await admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
                ).fetchone():
                    await asyncio.sleep(0.02)
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            assert row[0] != pid
    finally:
        await pool.close()


async def test_the_server_builds_each_notice_as_text_notice_would(
    pool: Pool, database_url: str
) -> None:
    """append_batches sends each text once and PostgreSQL builds its notice: offsets in
    characters, as Python counts them (not bytes); past MAX_NOTIFY_BYTES only where the text
    now ends; and nothing for a batch that did not apply."""
    async with pool.connection() as conn:
        small, big, stale = [await streaming_answer(conn) for _ in range(3)]
        await store.append_batches(conn, [store.TextBatch(small, 0, "Crème brûlée, ")])
        await conn.execute("UPDATE messages SET content = 'moved on' WHERE id = %s", (stale,))
    listener = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    for message_id in (small, big, stale):
        await listener.execute(f"LISTEN {store.text_channel(message_id)}")
    await listener.execute("LISTEN writer_test_sentinel")

    later = "then 🍮 and ünïcode"
    huge = "ü" * MAX_NOTIFY_BYTES  # 2 bytes a character: over the limit in bytes, not in chars
    async with pool.connection() as conn:
        applied = await store.append_batches(
            conn,
            [
                store.TextBatch(small, len("Crème brûlée, "), later),
                store.TextBatch(big, 0, huge),
                store.TextBatch(stale, 0, "too late"),
            ],
        )
        await conn.execute("SELECT pg_notify('writer_test_sentinel', '')")
    assert applied == {small, big}

    received = {}
    async with asyncio.timeout(5):
        async for notify in listener.notifies():
            if notify.channel == "writer_test_sentinel":
                break
            received[notify.channel] = notify.payload
    await listener.close()
    assert set(received) == {store.text_channel(small), store.text_channel(big)}
    assert parse_notice(received[store.text_channel(small)]) == parse_notice(
        text_notice(small, len("Crème brûlée, "), later)
    )
    assert parse_notice(received[store.text_channel(big)]) == parse_notice(
        text_notice(big, 0, huge)
    )
    assert parse_notice(received[store.text_channel(big)]) == Notice(m=str(big), n=len(huge))
    async with pool.connection() as conn:
        assert await content_of(conn, small) == "Crème brûlée, " + later
        assert await content_of(conn, big) == huge
