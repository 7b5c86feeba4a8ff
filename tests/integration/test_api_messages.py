"""The messages resource over real HTTP: asking, history, one message, its stream, cancel."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

import psycopg

from bench.fake_upstream import FakeUpstream, answer_text, directive
from tests.conftest import Gateway
from tests.integration.test_api_chats import (
    all_pages,
    ask_and_wait,
    assert_problem,
    assert_utc_time,
)
from tests.sse import TERMINAL_EVENTS, Event, deltas_text, read_events, stream_events

QUESTION = "What is the security deposit for renting a tent?"
# Long enough that no test waits for it: only a cancel (or a delete) ends such an answer.
NEVER_ANSWERS = directive(ttft_ms=120_000)


def messages_url(chat_id: str, *rest: str) -> str:
    return "/".join([f"/v1/chats/{chat_id}/messages", *rest])


async def ask_async(gateway: Gateway, chat_id: str, content: str) -> dict[str, Any]:
    """Ask with `Prefer: respond-async`; the 202 body."""
    response = await gateway.client.post(
        messages_url(chat_id), json={"content": content}, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


async def get_message(gateway: Gateway, chat_id: str, message_id: str) -> dict[str, Any]:
    response = await gateway.client.get(messages_url(chat_id, message_id))
    assert response.status_code == 200, response.text
    message: dict[str, Any] = response.json()
    return message


def assert_one_terminal(events: list[Event], name: str) -> dict[str, Any]:
    """Exactly one terminal event, the last one, named `name`; its Message."""
    names = [e.event for e in events]
    assert sum(n in TERMINAL_EVENTS for n in names) == 1, names
    assert names[-1] == name, names
    final: dict[str, Any] = events[-1].data
    return final


def assert_source(source: dict[str, Any]) -> None:
    assert set(source) == {"document", "title", "chunk", "score", "snippet"}
    assert isinstance(source["document"], str)
    assert source["document"]
    assert isinstance(source["chunk"], int)
    assert isinstance(source["score"], float | int)
    assert isinstance(source["snippet"], str)


# -- asking, waiting for the answer ------------------------------------------------------------


async def test_ask_waits_for_the_completed_answer(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat(title="waiting")
    response = await gateway.client.post(messages_url(chat_id), json={"content": QUESTION})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    UUID(answer["id"])
    assert answer["chat_id"] == chat_id
    assert answer["role"] == "assistant"
    assert answer["status"] == "completed"
    assert answer["finish_reason"] == "stop"
    assert answer["error"] is None
    assert isinstance(answer["content"], str)
    assert answer["content"].strip()
    assert answer["sources"]
    for source in answer["sources"]:
        assert_source(source)
    assert "repairs-and-rentals.md" in {s["document"] for s in answer["sources"]}
    assert assert_utc_time(answer["created_at"]) <= assert_utc_time(answer["completed_at"])

    # As stored: the question, then this answer.
    history = (await gateway.client.get(messages_url(chat_id))).json()
    assert [m["role"] for m in history["data"]] == ["user", "assistant"]
    question = history["data"][0]
    assert question["content"] == QUESTION
    assert question["status"] == "completed"
    assert question["chat_id"] == chat_id
    assert history["data"][1] == answer
    assert history["next_cursor"] is None


# -- asking with Prefer: respond-async, then streaming -----------------------------------------


async def test_ask_async_then_stream_the_answer(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    response = await gateway.client.post(
        messages_url(chat_id), json={"content": QUESTION}, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert set(accepted) == {"user_message", "assistant_message", "stream_url"}
    question, answer = accepted["user_message"], accepted["assistant_message"]
    assert question["role"] == "user"
    assert question["content"] == QUESTION
    assert question["status"] == "completed"
    assert question["chat_id"] == chat_id
    assert answer["role"] == "assistant"
    assert answer["status"] == "streaming"
    assert answer["chat_id"] == chat_id
    assert answer["completed_at"] is None
    stream_url = accepted["stream_url"]
    assert stream_url.endswith(messages_url(chat_id, answer["id"], "stream"))
    assert response.headers["location"] == stream_url

    async with gateway.client.stream(
        "GET", stream_url, headers={"Accept": "text/event-stream"}
    ) as streamed:
        assert streamed.headers["cache-control"] == "no-cache"
        assert streamed.headers["x-accel-buffering"] == "no"
        events = await read_events(streamed)

    assert events[0].event == "message.started"
    assert events[0].data["id"] == answer["id"]
    assert all(e.id for e in events), "every event but pings carries an id"
    final = assert_one_terminal(events, "message.completed")
    assert final["id"] == answer["id"]
    assert final["content"]
    assert deltas_text(events) == final["content"]
    assert final["sources"]
    assert await get_message(gateway, chat_id, answer["id"]) == final


async def test_ask_with_accept_event_stream_streams_the_answer(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    events = await stream_events(
        gateway.client, "POST", messages_url(chat_id), json={"content": QUESTION}
    )
    assert events[0].event == "message.started"
    assert events[0].data["user_message"]["content"] == QUESTION
    final = assert_one_terminal(events, "message.completed")
    assert deltas_text(events) == final["content"]


# -- resuming a stream -------------------------------------------------------------------------


async def finished_answer(gateway: Gateway) -> tuple[str, str, list[Event]]:
    """A completed answer: its chat, its id, and every event of its stream as it ran live."""
    chat_id = await gateway.create_chat()
    events = await stream_events(
        gateway.client, "POST", messages_url(chat_id), json={"content": QUESTION}
    )
    final = assert_one_terminal(events, "message.completed")
    assert deltas_text(events) == final["content"]
    # Streamed again from the start once it has ended, it replays the same answer.
    replay = await stream_events(
        gateway.client, "GET", messages_url(chat_id, final["id"], "stream")
    )
    assert replay[0].event == "message.started"
    assert assert_one_terminal(replay, "message.completed") == final
    assert deltas_text(replay) == final["content"]
    return chat_id, final["id"], events


async def test_resume_with_last_event_id_gets_exactly_the_rest(gateway: Gateway) -> None:
    chat_id, message_id, events = await finished_answer(gateway)
    url = messages_url(chat_id, message_id, "stream")
    deltas = [i for i, e in enumerate(events) if e.event == "message.delta"]
    assert deltas, "the answer has text"

    # From the opening event, the first delta, one in the middle and the last one.
    for stop in sorted({0, deltas[0], deltas[len(deltas) // 2], deltas[-1]}):
        seen = events[: stop + 1]
        header_form = await stream_events(
            gateway.client, "GET", url, headers={"Last-Event-ID": seen[-1].id}
        )
        query_form = await stream_events(
            gateway.client, "GET", url, params={"last_event_id": seen[-1].id}
        )
        for rest in (header_form, query_form):
            assert all(e.event != "message.started" for e in rest)
            final = assert_one_terminal(rest, "message.completed")
            assert deltas_text(seen) + deltas_text(rest) == final["content"]


async def test_last_event_id_of_the_terminal_event_is_204(gateway: Gateway) -> None:
    chat_id, message_id, events = await finished_answer(gateway)
    url = messages_url(chat_id, message_id, "stream")
    terminal_id = events[-1].id

    by_header = await gateway.client.get(url, headers={"Last-Event-ID": terminal_id})
    assert by_header.status_code == 204, by_header.text
    assert by_header.content == b""
    by_query = await gateway.client.get(url, params={"last_event_id": terminal_id})
    assert by_query.status_code == 204, by_query.text


async def test_garbage_last_event_id_is_400(gateway: Gateway) -> None:
    chat_id, message_id, events = await finished_answer(gateway)
    url = messages_url(chat_id, message_id, "stream")
    for garbage in ("garbage", "1.2.3.4", f"{events[0].id}x", "deadbeef.-1"):
        assert_problem(
            await gateway.client.get(url, headers={"Last-Event-ID": garbage}),
            400,
            "Last-Event-ID",
        )
        assert_problem(
            await gateway.client.get(url, params={"last_event_id": garbage}),
            400,
            "Last-Event-ID",
        )


async def test_last_event_id_of_another_message_is_400(gateway: Gateway) -> None:
    chat_id, message_id, _ = await finished_answer(gateway)
    _, _, other_events = await finished_answer(gateway)
    response = await gateway.client.get(
        messages_url(chat_id, message_id, "stream"),
        headers={"Last-Event-ID": other_events[1].id},
    )
    assert_problem(response, 400, "Last-Event-ID", message_id)


async def test_last_event_id_past_the_end_is_400(gateway: Gateway) -> None:
    chat_id, message_id, events = await finished_answer(gateway)
    tag = events[0].id.split(".")[0]
    response = await gateway.client.get(
        messages_url(chat_id, message_id, "stream"), headers={"Last-Event-ID": f"{tag}.999999"}
    )
    assert_problem(response, 400, "Last-Event-ID")


async def test_stream_of_a_user_message_is_400(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    await ask_and_wait(gateway, chat_id, QUESTION)
    question = (await gateway.client.get(messages_url(chat_id))).json()["data"][0]
    assert question["role"] == "user"
    response = await gateway.client.get(messages_url(chat_id, question["id"], "stream"))
    assert_problem(response, 400, question["id"])


async def test_stream_of_an_unknown_message_is_404(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    unknown = str(uuid4())
    response = await gateway.client.get(messages_url(chat_id, unknown, "stream"))
    assert_problem(response, 404, unknown)


# -- the history -------------------------------------------------------------------------------


async def test_history_pages_oldest_first(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    questions = [
        "How long do I have to return boots?",
        "Do you price match?",
        "What does Trailhead Plus cost?",
    ]
    answers = [await ask_and_wait(gateway, chat_id, q) for q in questions]

    pages = await all_pages(gateway, messages_url(chat_id), limit=2)
    assert [len(page) for page in pages] == [2, 2, 2]
    listed = [message for page in pages for message in page]
    assert len({m["id"] for m in listed}) == 6, "a message was listed twice"
    assert [m["role"] for m in listed] == ["user", "assistant"] * 3
    assert [m["content"] for m in listed[::2]] == questions
    assert listed[1::2] == answers
    times = [assert_utc_time(m["created_at"]) for m in listed]
    assert times == sorted(times)

    # Odd page sizes reach the same list; one big page holds it all with no cursor.
    assert [
        m for page in await all_pages(gateway, messages_url(chat_id), limit=4) for m in page
    ] == listed
    whole = (await gateway.client.get(messages_url(chat_id))).json()
    assert whole == {"data": listed, "next_cursor": None}


async def test_history_of_a_new_chat_is_empty(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    response = await gateway.client.get(messages_url(chat_id))
    assert response.status_code == 200, response.text
    assert response.json() == {"data": [], "next_cursor": None}


async def test_history_refusals(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    url = messages_url(chat_id)
    assert_problem(await gateway.client.get(url, params={"cursor": "nope!"}), 400, "cursor")
    for limit in ("0", "201", "many"):
        assert_problem(await gateway.client.get(url, params={"limit": limit}), 400, "limit")
    unknown = str(uuid4())
    assert_problem(await gateway.client.get(messages_url(unknown)), 404, unknown)
    assert_problem(await gateway.client.get(messages_url("chat-1")), 400, "chat-1")


# -- one message -------------------------------------------------------------------------------


async def test_get_one_message(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    answer = await ask_and_wait(gateway, chat_id, QUESTION)
    assert await get_message(gateway, chat_id, answer["id"]) == answer
    question = (await gateway.client.get(messages_url(chat_id))).json()["data"][0]
    assert await get_message(gateway, chat_id, question["id"]) == question


async def test_get_unknown_message_is_404(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    unknown = str(uuid4())
    assert_problem(await gateway.client.get(messages_url(chat_id, unknown)), 404, unknown)


async def test_message_of_another_chat_is_404(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    answer = await ask_and_wait(gateway, chat_id, QUESTION)
    other_chat = await gateway.create_chat()
    for path in (
        messages_url(other_chat, answer["id"]),
        messages_url(other_chat, answer["id"], "stream"),
    ):
        assert_problem(await gateway.client.get(path), 404, answer["id"])
    response = await gateway.client.post(messages_url(other_chat, answer["id"], "cancel"))
    assert_problem(response, 404, answer["id"])


async def test_malformed_message_id_is_400(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    for path in (
        messages_url(chat_id, "msg-1"),
        messages_url(chat_id, "msg-1", "stream"),
    ):
        assert_problem(await gateway.client.get(path), 400, "msg-1", "message id")
    response = await gateway.client.post(messages_url(chat_id, "msg-1", "cancel"))
    assert_problem(response, 400, "msg-1", "message id")


# -- asking: refusals --------------------------------------------------------------------------


async def test_invalid_asks_are_400_and_store_nothing(
    gateway: Gateway, db: psycopg.AsyncConnection
) -> None:
    chat_id = await gateway.create_chat()
    url = messages_url(chat_id)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"content": ""}, "content"),
        ({"content": "   "}, "content"),
        ({"content": "\n\t "}, "content"),
        ({"content": "x" * 32_001}, "content"),
        ({"content": 42}, "content"),
        ({"content": None}, "content"),
        ({}, "content"),
        ({"content": "Hello?", "temperature": 0.2}, "temperature"),
    ]
    for body, named in cases:
        assert_problem(await gateway.client.post(url, json=body), 400, named)
    for raw in (b'{"content": "cut', b"[]"):
        response = await gateway.client.post(
            url, content=raw, headers={"content-type": "application/json"}
        )
        assert_problem(response, 400)

    cur = await db.execute("SELECT count(*) FROM messages WHERE chat_id = %s", (chat_id,))
    assert await cur.fetchone() == (0,)


async def test_nul_in_content_is_400_not_500(gateway: Gateway) -> None:
    """PostgreSQL text cannot hold U+0000; that is the client's mistake, not ours."""
    chat_id = await gateway.create_chat()
    response = await gateway.client.post(
        messages_url(chat_id), json={"content": "tent\u0000deposit"}
    )
    assert_problem(response, 400, "content")


async def test_ask_without_a_body_is_400_naming_the_body(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    response = await gateway.client.post(messages_url(chat_id))
    body = assert_problem(response, 400)
    assert "body" in body["detail"].lower() or "content" in body["detail"].lower(), body


async def test_ask_in_an_unknown_chat_is_404(gateway: Gateway) -> None:
    unknown = str(uuid4())
    response = await gateway.client.post(messages_url(unknown), json={"content": QUESTION})
    assert_problem(response, 404, unknown)


async def test_ask_with_a_malformed_chat_id_is_400(gateway: Gateway) -> None:
    response = await gateway.client.post(messages_url("chat-1"), json={"content": QUESTION})
    assert_problem(response, 400, "chat-1")


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_of_a_completed_answer_is_409(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    answer = await ask_and_wait(gateway, chat_id, QUESTION)
    response = await gateway.client.post(messages_url(chat_id, answer["id"], "cancel"))
    assert_problem(response, 409, answer["id"], "completed")
    assert await get_message(gateway, chat_id, answer["id"]) == answer


async def test_cancel_of_a_user_message_is_400(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    await ask_and_wait(gateway, chat_id, QUESTION)
    question = (await gateway.client.get(messages_url(chat_id))).json()["data"][0]
    response = await gateway.client.post(messages_url(chat_id, question["id"], "cancel"))
    assert_problem(response, 400, question["id"])


async def test_cancel_of_an_unknown_message_is_404(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat()
    unknown = str(uuid4())
    response = await gateway.client.post(messages_url(chat_id, unknown, "cancel"))
    assert_problem(response, 404, unknown)


# -- one question at a time (a slow fake LLM keeps the first answer running) -------------------


async def test_asks_racing_on_one_chat_start_one_answer_and_refuse_the_rest(
    llm_gateway: Gateway, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    chat_id = await llm_gateway.create_chat()
    responses = await asyncio.gather(
        *(
            llm_gateway.client.post(
                messages_url(chat_id),
                json={"content": f"Question {i} {NEVER_ANSWERS}"},
                headers={"Prefer": "respond-async"},
            )
            for i in range(8)
        )
    )
    accepted = [r for r in responses if r.status_code == 202]
    assert len(accepted) == 1, [r.status_code for r in responses]
    running = accepted[0].json()["assistant_message"]["id"]
    for response in responses:
        if response is not accepted[0]:
            assert_problem(response, 409, running)
    cur = await db.execute(
        "SELECT role, status FROM messages WHERE chat_id = %s ORDER BY seq", (chat_id,)
    )
    assert await cur.fetchall() == [("user", "completed"), ("assistant", "streaming")]


async def test_second_ask_while_answering_is_409_until_cancelled(
    llm_gateway: Gateway, upstream: FakeUpstream
) -> None:
    client = llm_gateway.client
    chat_id = await llm_gateway.create_chat()
    running = (await ask_async(llm_gateway, chat_id, f"Slow, please {NEVER_ANSWERS}"))[
        "assistant_message"
    ]
    assert (await get_message(llm_gateway, chat_id, running["id"]))["status"] == "streaming"

    # Whatever the negotiation, the chat is busy and the refusal names the running answer.
    for headers in ({}, {"Prefer": "respond-async"}, {"Accept": "text/event-stream"}):
        response = await client.post(
            messages_url(chat_id), json={"content": "And another thing?"}, headers=headers
        )
        assert_problem(response, 409, running["id"])

    cancelled = await client.post(messages_url(chat_id, running["id"], "cancel"))
    assert cancelled.status_code == 200, cancelled.text
    ended = cancelled.json()
    assert ended["id"] == running["id"]
    assert ended["status"] == "cancelled"
    assert ended["completed_at"] is not None
    assert await get_message(llm_gateway, chat_id, running["id"]) == ended
    # Cancelling what is already cancelled changes nothing.
    again = await client.post(messages_url(chat_id, running["id"], "cancel"))
    assert again.status_code == 200, again.text
    assert again.json() == ended
    # Its stream replays the end at once.
    events = await stream_events(client, "GET", messages_url(chat_id, running["id"], "stream"))
    assert assert_one_terminal(events, "message.cancelled")["id"] == running["id"]

    # The chat is free again.
    answer = await ask_and_wait(llm_gateway, chat_id, "Now a quick one.")
    assert answer["content"] == answer_text(upstream.scenario)
    history = (await client.get(messages_url(chat_id))).json()["data"]
    assert [(m["role"], m["status"]) for m in history] == [
        ("user", "completed"),
        ("assistant", "cancelled"),
        ("user", "completed"),
        ("assistant", "completed"),
    ]


async def test_delete_cancels_a_running_answer(
    llm_gateway: Gateway, db: psycopg.AsyncConnection
) -> None:
    chat_id = await llm_gateway.create_chat()
    running = (await ask_async(llm_gateway, chat_id, f"Slow, please {NEVER_ANSWERS}"))[
        "assistant_message"
    ]
    response = await llm_gateway.client.delete(f"/v1/chats/{chat_id}")
    assert response.status_code == 204, response.text
    assert_problem(
        await llm_gateway.client.get(messages_url(chat_id, running["id"])), 404, running["id"]
    )
    cur = await db.execute("SELECT count(*) FROM messages WHERE chat_id = %s", (chat_id,))
    assert await cur.fetchone() == (0,)
