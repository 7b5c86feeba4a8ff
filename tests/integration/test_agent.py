"""The knowledge-base agent: the model calls the search tool, the gateway runs it, sources cited."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import psycopg

from bench.fake_upstream import FakeUpstream, Scenario, answer_text
from tests.conftest import Gateway, GatewayFactory
from tests.sse import TERMINAL_EVENTS, Event, deltas_text, read_events, stream_events

DEPOSIT_CALL = {"name": "search_knowledge_base", "arguments": '{"query": "tent rental deposit"}'}
GIFT_CARD_CALL = {"name": "search_knowledge_base", "arguments": '{"query": "gift cards expire"}'}


async def ask_stream(gateway: Gateway, content: str) -> list[Event]:
    chat_id = await gateway.create_chat()
    return await stream_events(
        gateway.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": content}
    )


def documents(sources: list[dict[str, Any]]) -> set[str]:
    return {s["document"] for s in sources}


async def test_one_tool_round(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    upstream.set_scenario(tool_calls=[DEPOSIT_CALL], text="The deposit is $100.")
    events = await ask_stream(llm_gateway, "How much is the deposit to rent a tent?")
    names = [e.event for e in events]
    assert names[:3] == ["message.started", "tool.call", "tool.result"]
    assert names[-1] == "message.completed"
    call, result = events[1], events[2]
    assert call.data["name"] == "search_knowledge_base"
    assert call.data["query"] == "tent rental deposit"
    assert result.data["id"] == call.data["id"]
    assert "repairs-and-rentals.md" in documents(result.data["sources"])
    final = events[-1].data
    assert final["content"] == "The deposit is $100." == deltas_text(events)
    assert "repairs-and-rentals.md" in documents(final["sources"])
    # What the model got back: its own call, then the passages as the tool's answer.
    sent = upstream.last_request()["messages"]
    assert sent[-2]["role"] == "assistant"
    assert sent[-2]["tool_calls"][0]["function"]["name"] == "search_knowledge_base"
    assert sent[-1]["role"] == "tool"
    assert sent[-1]["tool_call_id"] == sent[-2]["tool_calls"][0]["id"]
    passages = json.loads(sent[-1]["content"])["results"]
    assert any("$100" in p["passage"] for p in passages)
    assert upstream.last_request()["tools"][0]["function"]["name"] == "search_knowledge_base"
    # Stored with the message, at their place in the text.
    cur = await db.execute("SELECT tool_events FROM messages WHERE id = %s", (final["id"],))
    row = await cur.fetchone()
    assert row is not None
    assert [(e["k"], e["o"], e["event"]) for e in row[0]] == [
        (1, 0, "tool.call"),
        (2, 0, "tool.result"),
    ]


async def test_two_tool_rounds(llm_gateway: Gateway, upstream: FakeUpstream) -> None:
    upstream.set_scenario(tool_rounds=[[DEPOSIT_CALL], [GIFT_CARD_CALL]], text="Both answered.")
    events = await ask_stream(llm_gateway, "Tent deposit, and do gift cards expire?")
    tool_events = [(e.event, e.data.get("query")) for e in events if e.event.startswith("tool.")]
    assert tool_events == [
        ("tool.call", "tent rental deposit"),
        ("tool.result", None),
        ("tool.call", "gift cards expire"),
        ("tool.result", None),
    ]
    final = events[-1].data
    assert final["status"] == "completed"
    assert {"repairs-and-rentals.md", "payment-methods.md"} <= documents(final["sources"])
    roles = [m["role"] for m in upstream.last_request()["messages"]]
    assert roles[-4:] == ["assistant", "tool", "assistant", "tool"]
    assert upstream.stats()["requests"] == 3


async def test_malformed_tool_arguments_are_reported_to_the_model(
    llm_gateway: Gateway, upstream: FakeUpstream
) -> None:
    bad = {"name": "search_knowledge_base", "arguments": '{"query": "tent dep'}
    upstream.set_scenario(tool_calls=[bad], text="Sorry, let me answer anyway.")
    events = await ask_stream(llm_gateway, "Deposit?")
    result = next(e for e in events if e.event == "tool.result")
    assert "not valid JSON" in result.data["error"]
    assert result.data["sources"] == []
    tool_message = upstream.last_request()["messages"][-1]
    assert "not valid JSON" in json.loads(tool_message["content"])["error"]
    assert events[-1].event == "message.completed"
    assert events[-1].data["content"] == "Sorry, let me answer anyway."


async def test_nul_in_tool_arguments_and_error_bodies_cannot_block_storing_the_answer(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    """PostgreSQL's text and jsonb cannot hold NUL; what the LLM sends may. The answer must
    still be stored, never retried forever."""
    nul_call = {"name": "search_knowledge_base", "arguments": '{"query": "tent\\u0000deposit"}'}
    upstream.set_scenario(tool_calls=[nul_call], text="The deposit is $100.")
    events = await ask_stream(llm_gateway, "Deposit?")
    assert events[-1].event == "message.completed"
    cur = await db.execute(
        "SELECT status, tool_events::text FROM messages WHERE id = %s", (events[-1].data["id"],)
    )
    row = await cur.fetchone()
    assert row is not None
    assert row[0] == "completed"
    assert "tent" in row[1]


async def test_a_model_that_never_stops_calling_tools_fails_cleanly(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", kb_max_rounds=1
    )
    upstream.set_scenario(tool_rounds=[[DEPOSIT_CALL], [DEPOSIT_CALL], [DEPOSIT_CALL]])
    events = await ask_stream(gw, "Loop forever")
    assert events[-1].event == "message.failed"
    assert "kept calling tools" in events[-1].data["error"]
    # The last round told the model it may not call the tool any more.
    assert upstream.last_request()["tool_choice"] == "none"


async def test_prefetch_mode_searches_before_the_call(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", kb_mode="prefetch"
    )
    upstream.set_scenario(text="Gift cards never expire.")
    events = await ask_stream(gw, "Do gift cards expire?")
    names = [e.event for e in events]
    assert names[1:3] == ["tool.call", "tool.result"]
    assert "payment-methods.md" in documents(events[-1].data["sources"])
    sent = upstream.last_request()
    assert "tools" not in sent
    system_notes = [m["content"] for m in sent["messages"] if m["role"] == "system"]
    assert any("payment-methods.md" in note for note in system_notes)
    assert sent["messages"][-1] == {"role": "user", "content": "Do gift cards expire?"}


async def test_extractive_answers_cite_the_right_document(gateway: Gateway) -> None:
    events = await ask_stream(gateway, "What is the security deposit for renting a tent?")
    result = next(e for e in events if e.event == "tool.result")
    assert result.data["sources"][0]["document"] == "repairs-and-rentals.md"
    final = events[-1].data
    assert final["sources"][0]["document"] == "repairs-and-rentals.md"
    assert "$100" in final["content"]


async def resume_from(client: httpx.AsyncClient, url: str, last_id: str | None) -> list[Event]:
    headers = {"Accept": "text/event-stream"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    async with client.stream("GET", url, headers=headers) as response:
        return await read_events(response)


async def test_tool_events_replay_in_place_from_any_cut(
    llm_gateway: Gateway, upstream: FakeUpstream
) -> None:
    """Cut after every event of a finished answer with two tool rounds and some text between
    them; the resumed stream must continue with exactly the events that followed."""
    upstream.set_scenario(tool_rounds=[[DEPOSIT_CALL], [GIFT_CARD_CALL]], tokens=6)
    chat_id = await llm_gateway.create_chat()
    accepted = await llm_gateway.client.post(
        f"/v1/chats/{chat_id}/messages",
        json={"content": "Two things"},
        headers={"Prefer": "respond-async"},
    )
    url = accepted.json()["stream_url"]
    full = await resume_from(llm_gateway.client, url, None)
    assert full[-1].event == "message.completed"
    assert deltas_text(full) == answer_text(Scenario(tokens=6))
    for cut in range(1, len(full) - 1):
        rest = await resume_from(llm_gateway.client, url, full[cut - 1].id)
        # Same sequence of tool events and the same text, from the cut on.
        expected_tools = [(e.event, e.data) for e in full[cut:] if e.event.startswith("tool.")]
        assert [(e.event, e.data) for e in rest if e.event.startswith("tool.")] == expected_tools
        assert deltas_text(full[:cut]) + deltas_text(rest) == full[-1].data["content"]
        assert sum(e.event in TERMINAL_EVENTS for e in rest) == 1


async def test_live_resume_after_a_tool_event(llm_gateway: Gateway, upstream: FakeUpstream) -> None:
    upstream.set_scenario(tool_calls=[DEPOSIT_CALL], tokens=40, tokens_per_second=200)
    chat_id = await llm_gateway.create_chat()
    first = await stream_events(
        llm_gateway.client,
        "POST",
        f"/v1/chats/{chat_id}/messages",
        json={"content": "Deposit?"},
        limit=3,
    )
    assert [e.event for e in first] == ["message.started", "tool.call", "tool.result"]
    url = f"/v1/chats/{chat_id}/messages/{first[0].data['id']}/stream"
    rest = await resume_from(llm_gateway.client, url, first[-1].id)
    assert not [e for e in rest if e.event.startswith("tool.") or e.event == "message.started"]
    assert deltas_text(rest) == answer_text(Scenario(tokens=40))
    assert rest[-1].event == "message.completed"


async def test_tool_events_the_database_refuses_end_the_answer_failed_with_its_whole_text(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    """PostgreSQL refusing the answer's tool events (the one part of the end not already
    cleaned of what it cannot hold) will refuse them again however long the gateway waits:
    the end is stored without them, `failed` and saying why, with the whole text."""
    chat_id = await llm_gateway.create_chat()
    name = f"refuse_tool_events_{uuid.uuid4().hex}"
    # Every change of this chat's tool events fails as bad data would (22023 → DataError).
    await db.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        f" IF NEW.chat_id = '{chat_id}' AND NEW.tool_events IS DISTINCT FROM OLD.tool_events"
        " THEN RAISE EXCEPTION 'tool events refused' USING ERRCODE = '22023'; END IF;"
        " RETURN NEW; END $$"
    )
    await db.execute(
        f"CREATE TRIGGER {name} BEFORE UPDATE ON messages FOR EACH ROW EXECUTE FUNCTION {name}()"
    )
    try:
        upstream.set_scenario(tool_calls=[DEPOSIT_CALL], text="The deposit is $100.")
        events = await stream_events(
            llm_gateway.client,
            "POST",
            f"/v1/chats/{chat_id}/messages",
            json={"content": "How much is the deposit?"},
        )
    finally:
        await db.execute(f"DROP TRIGGER {name} ON messages")
        await db.execute(f"DROP FUNCTION {name}()")
    # The stream had the tool events as they happened; its end says what was stored.
    assert [e.event for e in events][1:3] == ["tool.call", "tool.result"]
    final = events[-1]
    assert final.event == "message.failed"
    assert final.data["content"] == "The deposit is $100." == deltas_text(events)
    assert "could not be stored whole" in final.data["error"]
    cur = await db.execute(
        "SELECT status, content, error, tool_events FROM messages WHERE id = %s",
        (final.data["id"],),
    )
    row = await cur.fetchone()
    assert row is not None
    assert row[:2] == ("failed", "The deposit is $100.")
    assert "tool events refused" in row[2]
    assert row[3] == []
