"""Turns outlive connections; upstream faults end answers with the documented status."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any

import psycopg
import pytest

from bench.fake_upstream import FakeUpstream, Scenario, answer_text, answer_tokens
from tests.conftest import Gateway, GatewayFactory
from tests.sse import TERMINAL_EVENTS, deltas_text, stream_events


async def stored(db: psycopg.AsyncConnection, message_id: str) -> dict[str, Any]:
    cur = await db.execute(
        "SELECT content, status, finish_reason, error, input_tokens, output_tokens"
        " FROM messages WHERE id = %s",
        (message_id,),
    )
    row = await cur.fetchone()
    assert row is not None
    keys = ("content", "status", "finish_reason", "error", "input_tokens", "output_tokens")
    return dict(zip(keys, row, strict=True))


async def wait_for_status(
    db: psycopg.AsyncConnection, message_id: str, *, within: float = 15
) -> dict[str, Any]:
    """Poll until the message leaves `streaming` (a bounded wait on a condition)."""
    async with asyncio.timeout(within):
        while True:
            row = await stored(db, message_id)
            if row["status"] != "streaming":
                return row
            await asyncio.sleep(0.02)


async def test_llm_answer_streams_and_is_stored_with_usage(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    upstream.set_scenario(tokens=30)
    chat_id = await llm_gateway.create_chat()
    events = await stream_events(
        llm_gateway.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "Hi"}
    )
    # One delta per upstream token: nothing merged on the way.
    assert [e.data["text"] for e in events if e.event == "message.delta"] == answer_tokens(
        Scenario(tokens=30)
    )
    final = events[-1].data
    assert events[-1].event == "message.completed"
    assert final["model"] == "fake-model"
    assert final["usage"]["output_tokens"] == 30
    row = await stored(db, final["id"])
    assert row["content"] == answer_text(Scenario(tokens=30)) == deltas_text(events)
    assert row["status"] == "completed"
    # The request the gateway encodes itself still goes out as JSON.
    assert upstream.stats()["last_headers"]["content-type"] == "application/json"
    assert upstream.last_request()["messages"][-1] == {"role": "user", "content": "Hi"}


async def test_a_gzip_encoded_stream_from_the_llm_is_decoded_and_relayed_whole(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    """An encoded body cannot be parsed as it arrives on the connection: it goes through
    httpx2's decoding reader instead, token for token all the same."""
    upstream.set_scenario(tokens=25, gzip=True)
    chat_id = await llm_gateway.create_chat()
    events = await stream_events(
        llm_gateway.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "Hi"}
    )
    scenario = Scenario(tokens=25)
    assert [e.data["text"] for e in events if e.event == "message.delta"] == answer_tokens(scenario)
    assert events[-1].event == "message.completed"
    assert events[-1].data["usage"]["output_tokens"] == 25
    row = await stored(db, events[-1].data["id"])
    assert row["content"] == answer_text(scenario)
    assert row["finish_reason"] == "stop"


async def test_history_and_system_prompt_reach_the_llm(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", system_prompt="Be terse."
    )
    upstream.set_scenario(text="First answer.")
    chat_id = await gw.create_chat()
    first = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "Q1"})
    assert first.status_code == 200, first.text
    upstream.set_scenario(text="Second answer.")
    second = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "Q2"})
    assert second.json()["content"] == "Second answer."
    sent = upstream.last_request()
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("system", "Be terse."),
        ("user", "Q1"),
        ("assistant", "First answer."),
        ("user", "Q2"),
    ]
    assert sent["stream"] is True
    assert sent["model"] == "fake-model"


async def test_history_budget_keeps_the_newest_turns(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", history_budget_chars=30
    )
    chat_id = await gw.create_chat()
    for question, answer in (("old question", "old answer"), ("new question", "new answer")):
        upstream.set_scenario(text=answer)
        response = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": question})
        assert response.status_code == 200
    await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "latest"})
    contents = [m["content"] for m in upstream.last_request()["messages"][1:]]
    assert contents == ["new question", "new answer", "latest"]


async def test_a_client_that_disconnects_does_not_stop_the_answer(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    scenario = {"tokens": 50, "tokens_per_second": 200}
    upstream.set_scenario(**scenario)
    chat_id = await llm_gateway.create_chat()
    events = await stream_events(
        llm_gateway.client,
        "POST",
        f"/v1/chats/{chat_id}/messages",
        json={"content": "Go"},
        limit=4,
    )
    assert events[0].event == "message.started"
    row = await wait_for_status(db, events[0].data["id"])
    assert row["status"] == "completed"
    assert row["content"] == answer_text(Scenario(**scenario))  # type: ignore[arg-type]


async def test_an_unwatched_answer_is_interrupted_after_the_orphan_timeout(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", orphan_seconds=0.3
    )
    upstream.set_scenario(tokens=400, tokens_per_second=100)
    chat_id = await gw.create_chat()
    events = await stream_events(
        gw.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "Go"}, limit=3
    )
    row = await wait_for_status(db, events[0].data["id"])
    assert row["status"] == "interrupted"
    assert row["finish_reason"] == "client_gone"
    # The partial text is kept, and it is a prefix of what the model was saying.
    assert row["content"]
    assert answer_text(Scenario(tokens=400)).startswith(row["content"])
    # The upstream call was cancelled too, not left running.
    async with asyncio.timeout(5):
        while upstream.stats()["active"]:
            await asyncio.sleep(0.02)


async def test_cancel_keeps_the_partial_text(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    upstream.set_scenario(tokens=400, tokens_per_second=100)
    chat_id = await llm_gateway.create_chat()
    accepted = await llm_gateway.client.post(
        f"/v1/chats/{chat_id}/messages",
        json={"content": "Go"},
        headers={"Prefer": "respond-async"},
    )
    message_id = accepted.json()["assistant_message"]["id"]
    first = await stream_events(llm_gateway.client, "GET", accepted.json()["stream_url"], limit=4)
    cancelled = await llm_gateway.client.post(f"/v1/chats/{chat_id}/messages/{message_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    row = await stored(db, message_id)
    assert row["status"] == "cancelled"
    assert row["content"].startswith(deltas_text(first))
    # A stream opened afterwards replays the text and ends with the one terminal event.
    replay = await stream_events(llm_gateway.client, "GET", accepted.json()["stream_url"])
    assert replay[-1].event == "message.cancelled"
    assert deltas_text(replay) == row["content"]


FAULTS: list[tuple[dict[str, Any], str, str, str, bool]] = [
    # (scenario, status, finish_reason, error fragment, partial text expected)
    ({"fault": "http_500"}, "failed", "error", "HTTP 500", False),
    ({"fault": "http_429"}, "failed", "error", "HTTP 429", False),
    ({"fault": "cut", "fault_after": 5}, "failed", "error", "connection", True),
    ({"fault": "malformed", "fault_after": 5}, "failed", "error", "malformed", True),
    (
        {"fault": "stall", "fault_after": 5, "stall_seconds": 3},
        "interrupted",
        "upstream_idle_timeout",
        "stopped sending",
        True,
    ),
    (
        {"ttft_ms": 3000},
        "interrupted",
        "upstream_first_token_timeout",
        "no first token",
        False,
    ),
    (
        {"tokens_per_second": 4},
        "interrupted",
        "upstream_total_timeout",
        "total time",
        True,
    ),
]


@pytest.mark.parametrize(
    ("scenario", "status", "reason", "error", "partial"),
    FAULTS,
    ids=["http_500", "http_429", "cut", "malformed", "stall", "first_token", "total"],
)
async def test_upstream_faults_end_the_answer_as_documented(
    gateway_factory: GatewayFactory,
    upstream: FakeUpstream,
    db: psycopg.AsyncConnection,
    scenario: dict[str, Any],
    status: str,
    reason: str,
    error: str,
    partial: bool,
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url,
        model="fake-model",
        llm_first_token_timeout_seconds=0.5,
        llm_idle_timeout_seconds=0.5,
        llm_total_timeout_seconds=1.5,
    )
    upstream.set_scenario(**{"tokens": 20, **scenario})
    chat_id = await gw.create_chat()
    events = await stream_events(
        gw.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "Go"}
    )
    terminal = events[-1]
    assert terminal.event == f"message.{status}"
    assert sum(e.event in TERMINAL_EVENTS for e in events) == 1
    assert terminal.data["finish_reason"] == reason
    assert error in terminal.data["error"]
    row = await stored(db, terminal.data["id"])
    assert row["status"] == status
    assert row["content"] == deltas_text(events)
    assert bool(row["content"]) is partial
    if partial and scenario.get("fault"):
        assert row["content"] == "".join(answer_tokens(Scenario(tokens=20))[:5])
    # The chat is free again for the next question.
    upstream.reset()
    again = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "Again"})
    assert again.json()["status"] == "completed"


async def test_rate_limits_are_retried_before_the_first_token(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", llm_max_retries=2
    )
    upstream.set_scenario(fault="http_429", fault_times=1, tokens=5)
    chat_id = await gw.create_chat()
    response = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "Go"})
    assert response.json()["status"] == "completed"
    assert upstream.stats()["faults"]["http_429"] == 1


async def test_curl_streams_the_answer(llm_gateway: Gateway, upstream: FakeUpstream) -> None:
    """The README's curl command, run for real."""
    upstream.set_scenario(tokens=12)
    chat_id = await llm_gateway.create_chat()
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test"
    result = await asyncio.to_thread(
        subprocess.run,
        [
            curl,
            "-sN",
            "-H",
            "Accept: text/event-stream",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"content":"Hello"}',
            f"{llm_gateway.base_url}/v1/chats/{chat_id}/messages",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    lines = result.stdout.splitlines()
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert names[0] == "message.started"
    assert names.count("message.delta") == 12
    assert names[-1] == "message.completed"
    assert lines[0].startswith("retry: ")


async def test_circuit_breaker_fails_fast_and_recovers(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url,
        model="fake-model",
        llm_breaker_failures=2,
        llm_breaker_seconds=0.5,
        kb_mode="prefetch",
    )
    chat_id = await gw.create_chat()
    url = f"/v1/chats/{chat_id}/messages"
    upstream.set_scenario(fault="http_500")
    for _ in range(2):
        assert (await gw.client.post(url, json={"content": "Q"})).json()["status"] == "failed"
    calls = upstream.stats()["requests"]
    upstream.set_scenario(tokens=3)  # healthy again, but the breaker is open
    fast = (await gw.client.post(url, json={"content": "Q"})).json()
    assert fast["status"] == "failed"
    assert "not calling it" in fast["error"]
    assert upstream.stats()["requests"] == calls  # failed fast: no call made
    await asyncio.sleep(0.6)  # the cooldown itself is what is tested: time has to pass
    recovered = (await gw.client.post(url, json={"content": "Q"})).json()
    assert recovered["status"] == "completed"


async def test_answers_reuse_the_upstream_connection(
    llm_gateway: Gateway, upstream: FakeUpstream
) -> None:
    """One keep-alive connection serves answer after answer: no TCP (or TLS) set-up per ask."""
    upstream.set_scenario(tokens=5)
    for _ in range(5):
        chat_id = await llm_gateway.create_chat()
        events = await stream_events(
            llm_gateway.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "Hi"}
        )
        assert events[-1].event == "message.completed"
    stats = upstream.stats()
    assert stats["requests"] == 5
    assert stats["connections"] == 1


async def test_a_nul_from_the_llm_is_replaced_so_the_answer_can_be_stored(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    upstream.set_scenario(text="before \x00 after and more words to batch")
    chat_id = await llm_gateway.create_chat()
    events = await stream_events(
        llm_gateway.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "Hi"}
    )
    assert events[-1].event == "message.completed"
    expected = "before \ufffd after and more words to batch"
    assert deltas_text(events) == expected
    row = await stored(db, events[-1].data["id"])
    assert (row["status"], row["content"]) == ("completed", expected)
