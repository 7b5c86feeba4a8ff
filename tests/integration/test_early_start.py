"""The early LLM call: sent while the question is stored, kept only if the history matches."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from psycopg.conninfo import make_conninfo

from bench.fake_upstream import FakeUpstream
from qna_gateway.auth import ANONYMOUS
from qna_gateway.histories import KnownHistories
from qna_gateway.settings import Secret
from qna_gateway.telemetry import create_telemetry
from tests.conftest import Gateway, GatewayFactory
from tests.integration.test_security import api_keys, create_chat, new_tenants


def early_starts(gateway: Gateway, outcome: str) -> float:
    services = gateway.lifecycle.services
    assert services is not None
    value = services.telemetry.metrics.registry.get_sample_value(
        "llm_early_starts_total", {"outcome": outcome}
    )
    return value or 0.0


def histories_of(gateway: Gateway) -> KnownHistories:
    services = gateway.lifecycle.services
    assert services is not None
    assert services.manager.histories is not None
    return services.manager.histories


async def ask(gateway: Gateway, chat_id: str, content: str, **kwargs: Any) -> dict[str, Any]:
    """Ask and wait for the whole answer (the JSON form of the ask)."""
    response = await gateway.client.post(
        f"/v1/chats/{chat_id}/messages", json={"content": content}, **kwargs
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def sent_lines(upstream: FakeUpstream) -> list[tuple[str, str]]:
    """The conversation of the upstream's last request, without the system prompt."""
    return [(m["role"], m["content"]) for m in upstream.last_request()["messages"][1:]]


async def test_first_ask_and_follow_ups_use_the_call_started_early(
    llm_gateway: Gateway, upstream: FakeUpstream
) -> None:
    chat_id = await llm_gateway.create_chat()
    upstream.set_scenario(text="First answer.")
    first = await ask(llm_gateway, chat_id, "Question one?")
    assert first["status"] == "completed"
    assert first["content"] == "First answer."
    assert sent_lines(upstream) == [("user", "Question one?")]

    upstream.set_scenario(text="Second answer.")
    second = await ask(llm_gateway, chat_id, "Question two?")
    assert second["content"] == "Second answer."
    assert sent_lines(upstream) == [
        ("user", "Question one?"),
        ("assistant", "First answer."),
        ("user", "Question two?"),
    ]
    assert early_starts(llm_gateway, "used") == 2
    assert early_starts(llm_gateway, "abandoned") == 0
    assert upstream.stats()["requests"] == 2  # one call per ask: none sent twice


async def test_the_guess_cuts_the_history_as_the_statement_does(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    """A small budget, answers of every length, a failed answer without text: each ask's
    expected history is the one the statement reads (else the call would be abandoned)."""
    gateway = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", history_budget_chars=60
    )
    chat_id = await gateway.create_chat()
    # Question 0 (11) + "Short." (6) + Question 1 (11) + 32: exactly the budget, all sent.
    answers = ["Short.", "An answer exactly 32 chars long.", "", "x" * 61, "Ok."]
    for number, text in enumerate(answers):
        if text:
            upstream.set_scenario(text=text)
        else:
            upstream.set_scenario(fault="http_500")  # ends `failed`, with no text stored
        answer = await ask(gateway, chat_id, f"Question {number}?")
        assert answer["content"] == text
        if number == 2:
            assert sent_lines(upstream)[:4] == [
                ("user", "Question 0?"),
                ("assistant", "Short."),
                ("user", "Question 1?"),
                ("assistant", answers[1]),
            ]
    assert early_starts(gateway, "used") == len(answers)
    assert early_starts(gateway, "abandoned") == 0
    # The last call: what fits in 60 characters, newest first, the empty answer left out
    # (the 61-character answer alone is over the budget, so nothing before it is sent).
    assert sent_lines(upstream) == [("user", "Question 4?")]


async def test_a_history_changed_behind_the_process_abandons_the_early_call(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    chat_id = await llm_gateway.create_chat()
    upstream.set_scenario(text="First answer.")
    await ask(llm_gateway, chat_id, "Question one?")
    # Another writer (a replica of an older version, say) adds an exchange without a notice.
    await db.execute(
        "INSERT INTO messages (id, chat_id, role, content, status) VALUES"
        " (%s, %s, 'user', 'Asked elsewhere?', 'completed'),"
        " (%s, %s, 'assistant', 'Answered elsewhere.', 'completed')",
        (uuid.uuid4(), chat_id, uuid.uuid4(), chat_id),
    )
    # Slow enough that the early call is cut before its stream starts.
    upstream.set_scenario(text="Second answer.", ttft_ms=300)
    second = await ask(llm_gateway, chat_id, "Question two?")
    assert second["content"] == "Second answer."
    assert sent_lines(upstream) == [
        ("user", "Question one?"),
        ("assistant", "First answer."),
        ("user", "Asked elsewhere?"),
        ("assistant", "Answered elsewhere."),
        ("user", "Question two?"),
    ]
    assert early_starts(llm_gateway, "used") == 1
    assert early_starts(llm_gateway, "abandoned") == 1
    stats = upstream.stats()
    assert stats["requests"] == 3
    assert stats["completed"] == 2  # the abandoned call never ran to its end
    # Its connection was closed, not left open: the upstream saw the client go.
    async with asyncio.timeout(5):
        while upstream.stats()["disconnects"] < 1:
            await asyncio.sleep(0.02)


async def test_an_answer_ended_on_another_replica_drops_the_guess(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    here = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    there = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    chat_id = await here.create_chat()
    upstream.set_scenario(text="Answered there.")
    await ask(there, chat_id, "Asked there?")
    histories = histories_of(here)
    # The other replica's end notice reaches this one, which forgets what it expected.
    async with asyncio.timeout(5):
        while uuid.UUID(chat_id) in histories:
            await asyncio.sleep(0.01)

    upstream.set_scenario(text="Answered here.")
    await ask(here, chat_id, "Asked here?")
    assert sent_lines(upstream) == [
        ("user", "Asked there?"),
        ("assistant", "Answered there."),
        ("user", "Asked here?"),
    ]
    # No early call on either side: `there` did not know the chat, `here` no longer did.
    for gateway in (here, there):
        assert early_starts(gateway, "used") == early_starts(gateway, "abandoned") == 0
    assert upstream.stats()["requests"] == 2


async def test_an_ask_that_fails_abandons_its_early_call(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    chat_id = await llm_gateway.create_chat()
    # Deleted by hand, without the API's notice: the process still expects the chat, and only
    # the statement's 404 tells it otherwise (the README says what this costs).
    await db.execute("DELETE FROM chats WHERE id = %s", (chat_id,))
    upstream.set_scenario(ttft_ms=300)
    response = await llm_gateway.client.post(
        f"/v1/chats/{chat_id}/messages", json={"content": "Anyone there?"}
    )
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert early_starts(llm_gateway, "abandoned") == 1
    assert early_starts(llm_gateway, "used") == 0
    cur = await db.execute("SELECT count(*) FROM messages WHERE chat_id = %s", (chat_id,))
    assert await cur.fetchone() == (0,)


async def test_a_turn_stopped_before_it_takes_its_early_call_abandons_it(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    """A stop that comes between the turn's creation and its first step (a cancel, a drain)
    means its answerer never reads the early call: the turn abandons it itself, so the call
    is cut, counted, and its connection closed."""
    chat_id = await llm_gateway.create_chat()
    services = llm_gateway.lifecycle.services
    assert services is not None
    upstream.set_scenario(text="Never read.", ttft_ms=300)
    _, answer, turn = await services.manager.start_turn(
        principal=ANONYMOUS, chat_id=uuid.UUID(chat_id), content="Stopped at once?"
    )
    # start_turn returned without yielding after creating the turn's task: it has not run.
    turn.stop("cancelled", "cancelled")
    async with asyncio.timeout(5):
        await turn.done.wait()
    assert turn.final is not None
    assert (turn.final.status, turn.final.content) == ("cancelled", "")
    cur = await db.execute("SELECT status FROM messages WHERE id = %s", (answer.id,))
    assert await cur.fetchone() == ("cancelled",)
    assert early_starts(llm_gateway, "abandoned") == 1
    assert early_starts(llm_gateway, "used") == 0
    # The call had gone out (the statement ran after it was sent) and was cut, not left open.
    async with asyncio.timeout(5):
        while upstream.stats()["disconnects"] < 1:
            await asyncio.sleep(0.02)
    stats = upstream.stats()
    assert (stats["requests"], stats["completed"], stats["active"]) == (1, 0, 0)


async def test_a_deleted_chat_is_not_sent_again_here_or_on_another_replica(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    """What was deleted must not go to the LLM again, not even in a call to be abandoned."""
    here = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    there = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    histories = histories_of(here)
    upstream.set_scenario(text="Secret answer.", ttft_ms=300)
    deleted_there, deleted_here = await here.create_chat(), await here.create_chat()
    for chat_id in (deleted_there, deleted_here):
        await ask(here, chat_id, "My secret question?")
        assert uuid.UUID(chat_id) in histories
    assert upstream.stats()["requests"] == 2

    assert (await there.client.delete(f"/v1/chats/{deleted_there}")).status_code == 204
    # The delete's notice reaches this replica, which forgets the chat.
    async with asyncio.timeout(5):
        while uuid.UUID(deleted_there) in histories:
            await asyncio.sleep(0.01)
    assert (await here.client.delete(f"/v1/chats/{deleted_here}")).status_code == 204
    assert uuid.UUID(deleted_here) not in histories

    for chat_id in (deleted_there, deleted_here):
        response = await here.client.post(
            f"/v1/chats/{chat_id}/messages", json={"content": "Again?"}
        )
        assert response.status_code == 404
    assert upstream.stats()["requests"] == 2
    assert early_starts(here, "abandoned") == 0


async def test_a_listener_that_lost_its_connection_forgets_every_guess(
    gateway_factory: GatewayFactory,
    upstream: FakeUpstream,
    database_url: str,
    db: psycopg.AsyncConnection,
) -> None:
    """Notices sent while the listener was away (a delete, another replica's answer) are lost:
    once it is back, this process expects nothing of any chat."""
    name = f"qna-test-{uuid.uuid4().hex[:12]}"
    gateway = await gateway_factory(
        database_url=Secret(make_conninfo(database_url, application_name=name)),
        openai_base_url=upstream.base_url,
        model="fake-model",
    )
    histories = histories_of(gateway)
    chat_ids = [uuid.UUID(await gateway.create_chat()) for _ in range(2)]
    assert all(chat_id in histories for chat_id in chat_ids)
    cur = await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND query LIKE 'LISTEN%%'",
        (name,),
    )
    assert await cur.fetchall() == [(True,)]  # exactly the gateway's listener
    async with asyncio.timeout(10):  # it reconnects after a short, jittered pause
        while len(histories):
            await asyncio.sleep(0.02)
    upstream.set_scenario(text="Answered.")
    assert (await ask(gateway, str(chat_ids[0]), "Question?"))["content"] == "Answered."
    assert early_starts(gateway, "used") == early_starts(gateway, "abandoned") == 0


async def test_no_early_call_while_the_breaker_is_half_open(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    """The half-open breaker lets one trial call through, whose outcome must be reported: an
    early call that is then abandoned would use it up, and the answer would fail fast."""
    gateway = await gateway_factory(
        openai_base_url=upstream.base_url,
        model="fake-model",
        llm_breaker_failures=1,
        llm_breaker_seconds=0.2,
        llm_max_retries=0,
    )
    chat_id = await gateway.create_chat()
    upstream.set_scenario(fault="http_500")
    assert (await ask(gateway, chat_id, "Question one?"))["status"] == "failed"  # now open
    # The history changes behind the process, so an early call would be abandoned.
    await db.execute(
        "INSERT INTO messages (id, chat_id, role, content, status)"
        " VALUES (%s, %s, 'user', 'Asked elsewhere?', 'completed')",
        (uuid.uuid4(), chat_id),
    )
    await asyncio.sleep(0.3)  # the cooldown is over: half-open
    upstream.set_scenario(text="Back again.", ttft_ms=100)
    answer = await ask(gateway, chat_id, "Question two?")
    assert answer["status"] == "completed"
    assert answer["content"] == "Back again."
    assert early_starts(gateway, "used") == 1  # the first ask's
    assert early_starts(gateway, "abandoned") == 0


async def test_no_early_call_for_another_principals_chat(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    """The history of alice's chat never goes out on bob's ask, not even to be abandoned."""
    alice, bob = new_tenants("alice", "bob")
    gateway = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", api_keys=api_keys(alice, bob)
    )
    chat_id = await create_chat(gateway, alice)
    response = await gateway.client.post(
        f"/v1/chats/{chat_id}/messages", json={"content": "Mine now?"}, headers=bob.auth
    )
    assert response.status_code == 404
    assert upstream.stats()["requests"] == 0
    assert early_starts(gateway, "abandoned") == early_starts(gateway, "used") == 0
    # alice's own ask still starts early: bob's attempt did not use up her chat's guess.
    await ask(gateway, chat_id, "Mine?", headers=alice.auth)
    assert early_starts(gateway, "used") == 1


async def test_switched_off(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> None:
    gateway = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", early_llm_start=False
    )
    chat_id = await gateway.create_chat()
    upstream.set_scenario(text="Answered.")
    assert (await ask(gateway, chat_id, "Question?"))["content"] == "Answered."
    assert early_starts(gateway, "used") == early_starts(gateway, "abandoned") == 0
    assert upstream.stats()["requests"] == 1


def finished_spans(gateway: Gateway, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    provider = gateway.app.state.telemetry.provider
    assert provider is not None
    assert provider.force_flush()
    return list(exporter.get_finished_spans())


async def test_early_calls_have_their_spans_in_the_asks_trace(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    exporter = InMemorySpanExporter()
    gateway = await gateway_factory(
        openai_base_url=upstream.base_url,
        model="fake-model",
        telemetry=create_telemetry({}, exporter=exporter),
    )
    chat_id = await gateway.create_chat()
    await ask(gateway, chat_id, "Question one?")
    spans = finished_spans(gateway, exporter)
    answer = next(s for s in spans if s.name == "answer")
    call = next(s for s in spans if s.name == "chat fake-model")
    statement = next(
        s for s in spans if "INSERT INTO messages" in str((s.attributes or {}).get("db.query.text"))
    )
    assert call.attributes is not None
    assert call.attributes["qna.early_call"] == "used"
    assert call.parent is not None
    assert call.parent.span_id == answer.context.span_id
    # Sent before the question was stored, and the answer's span starts with it.
    assert call.start_time is not None
    assert statement.start_time is not None
    assert call.start_time < statement.start_time
    assert answer.start_time == call.start_time

    exporter.clear()
    await db.execute(
        "INSERT INTO messages (id, chat_id, role, content, status)"
        " VALUES (%s, %s, 'user', 'Asked elsewhere?', 'completed')",
        (uuid.uuid4(), chat_id),
    )
    await ask(gateway, chat_id, "Question two?")
    spans = finished_spans(gateway, exporter)
    server = next(s for s in spans if s.kind == SpanKind.SERVER and s.name.startswith("POST"))
    calls = [s for s in spans if s.name == "chat fake-model"]
    abandoned = [s for s in calls if (s.attributes or {}).get("qna.early_call")]
    assert len(calls) == 2
    assert len(abandoned) == 1
    assert abandoned[0].attributes is not None
    assert abandoned[0].attributes["qna.early_call"] == "abandoned"
    assert abandoned[0].parent is not None
    assert abandoned[0].parent.span_id == server.context.span_id
