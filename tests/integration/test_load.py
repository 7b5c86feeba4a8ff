"""Load without loss: hundreds of concurrent asks on a real `qna-gateway serve` process.

The gateway runs as its own process (not on this test's event loop), so the load is the
gateway's to carry: this process only runs the clients and the fake upstream's thread.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import psycopg

from bench.fake_upstream import FakeUpstream, Scenario, answer_text
from tests.conftest import ServeProcess
from tests.sse import TERMINAL_EVENTS, deltas_text, read_events

CHATS = 100
ASKS_PER_CHAT = 3  # one after another in each chat; the chats all at once
SCENARIO = Scenario(tokens=20, tokens_per_second=50, ttft_ms=50)  # ~0.45 s an answer
# Fewer answers may run at once than chats ask at once: some asks are refused (503), and a
# refused ask must leave nothing behind.
MAX_TURNS = 64


@dataclass
class Ask:
    chat_id: str
    question: str
    status: int
    streamed: str = ""
    terminal: str = ""
    answer_id: str = ""
    question_id: str = ""


async def ask(client: httpx.AsyncClient, chat_id: str, question: str) -> Ask:
    async with client.stream(
        "POST",
        f"/v1/chats/{chat_id}/messages",
        json={"content": question},
        headers={"Accept": "text/event-stream"},
    ) as response:
        if response.status_code != 200:
            await response.aread()
            return Ask(chat_id, question, response.status_code)
        events = await read_events(response)
    started = events[0].data
    assert events[0].event == "message.started"
    assert sum(e.event in TERMINAL_EVENTS for e in events) == 1
    assert events[-1].data["content"] == deltas_text(events)
    return Ask(
        chat_id,
        question,
        200,
        streamed=deltas_text(events),
        terminal=events[-1].event,
        answer_id=started["id"],
        question_id=started["user_message"]["id"],
    )


async def one_chat(client: httpx.AsyncClient, index: int) -> list[Ask]:
    created = await client.post("/v1/chats", json={"title": f"load {index}"})
    assert created.status_code == 201, created.text
    chat_id = created.json()["id"]
    return [await ask(client, chat_id, f"chat {index}, question {k}") for k in range(ASKS_PER_CHAT)]


async def stored_messages(
    db: psycopg.AsyncConnection, chat_ids: list[str]
) -> dict[str, list[tuple[str, str, str, str]]]:
    cur = await db.execute(
        "SELECT chat_id::text, id::text, role, content, status FROM messages"
        " WHERE chat_id = ANY(%s::uuid[]) ORDER BY chat_id, seq",
        (chat_ids,),
    )
    by_chat: dict[str, list[tuple[str, str, str, str]]] = {c: [] for c in chat_ids}
    for chat_id, message_id, role, content, status in await cur.fetchall():
        by_chat[chat_id].append((message_id, role, content, status))
    return by_chat


async def test_hundreds_of_concurrent_asks_lose_nothing(
    serve_factory: Callable[..., ServeProcess],
    upstream: FakeUpstream,
    db: psycopg.AsyncConnection,
    record_property: Callable[[str, object], None],
) -> None:
    upstream.set_scenario(
        tokens=SCENARIO.tokens,
        tokens_per_second=SCENARIO.tokens_per_second,
        ttft_ms=SCENARIO.ttft_ms,
    )
    proc = serve_factory(
        OPENAI_BASE_URL=upstream.base_url,
        QNA_MODEL="fake-model",
        QNA_MAX_TURNS=str(MAX_TURNS),
        QNA_DB_POOL_MAX="20",
        QNA_LOG_LEVEL="WARNING",
    )
    # Idle connections are dropped before serve's 5 s keep-alive timeout would close them under
    # a request just being sent (a client-side race, not something the gateway could answer).
    limits = httpx.Limits(
        max_connections=CHATS * 2, max_keepalive_connections=CHATS * 2, keepalive_expiry=1.0
    )
    async with httpx.AsyncClient(base_url=proc.base_url, timeout=60, limits=limits) as client:
        per_chat = await asyncio.gather(*(one_chat(client, i) for i in range(CHATS)))
    asks = [a for chat in per_chat for a in chat]
    statuses = Counter(a.status for a in asks)
    accepted = [a for a in asks if a.status == 200]
    rejected = len(asks) - len(accepted)
    record_property("asks", len(asks))
    record_property("rejected_asks", rejected)
    print(f"\n{len(asks)} asks: {len(accepted)} streamed, {rejected} refused {dict(statuses)}")

    assert set(statuses) <= {200, 429, 503}, statuses  # refusals are clean; nothing is a 5xx
    assert statuses[200] + statuses[503] + statuses[429] == CHATS * ASKS_PER_CHAT
    assert accepted, statuses
    expected = answer_text(SCENARIO)
    assert {(a.terminal, a.streamed) for a in accepted} == {("message.completed", expected)}

    chat_ids = [chats[0].chat_id for chats in per_chat]
    stored = await stored_messages(db, chat_ids)
    for chat_id, chat_asks in zip(chat_ids, per_chat, strict=True):
        wanted: list[tuple[str, str, str, str]] = []
        for a in chat_asks:
            if a.status == 200:  # a refused ask stores nothing at all
                wanted.append((a.question_id, "user", a.question, "completed"))
                wanted.append((a.answer_id, "assistant", a.streamed, "completed"))
        assert stored[chat_id] == wanted, chat_id
