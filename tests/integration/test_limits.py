"""Limits and backpressure: the rate limit, caps on answers and streams, body size, history
budget, slow readers, slowloris, and upstream timeouts, each with its status and headers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from httpx_sse import EventSource

from bench.fake_upstream import FakeUpstream, Scenario, answer_text, answer_tokens, directive
from qna_gateway.limits import RateLimiter
from tests.conftest import Gateway, GatewayFactory, ServeProcess
from tests.fixtures.metrics import sample_value
from tests.integration.test_api_chats import assert_problem
from tests.integration.test_security import (
    Tenant,
    api_keys,
    ask_async,
    create_chat,
    new_tenants,
    request_head,
)
from tests.integration.test_turns import wait_for_status
from tests.sse import deltas_text, stream_events

NEVER_ANSWERS = {"ttft_ms": 120_000}  # only a cancel ends such an answer


async def llm_gateway_with(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, *tenants: Tenant, **settings: Any
) -> Gateway:
    if tenants:
        settings["api_keys"] = api_keys(*tenants)
    return await gateway_factory(openai_base_url=upstream.base_url, model="fake-model", **settings)


def assert_retry_after(response: httpx.Response) -> int:
    seconds = int(response.headers["retry-after"])
    assert seconds >= 1
    return seconds


async def messages_of(gateway: Gateway, tenant: Tenant | None, chat_id: str) -> list[Any]:
    headers = tenant.auth if tenant else {}
    response = await gateway.client.get(f"/v1/chats/{chat_id}/messages", headers=headers)
    assert response.status_code == 200, response.text
    data: list[Any] = response.json()["data"]
    return data


async def cancel(gateway: Gateway, tenant: Tenant | None, accepted: dict[str, Any]) -> None:
    answer = accepted["assistant_message"]
    response = await gateway.client.post(
        f"/v1/chats/{answer['chat_id']}/messages/{answer['id']}/cancel",
        headers=tenant.auth if tenant else {},
    )
    assert response.status_code == 200, response.text


def ask_headers(mode: str) -> dict[str, str]:
    return {
        "async": {"Prefer": "respond-async"},
        "sse": {"Accept": "text/event-stream"},
        "wait": {},
    }[mode]


# -- the rate limit ----------------------------------------------------------------------------


async def test_the_rate_limit_is_429_with_retry_after_and_ratelimit_headers(
    gateway_factory: GatewayFactory,
) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await gateway_factory(api_keys=api_keys(alice, bob), rate_limit_per_minute=5)
    limiter: RateLimiter = gw.app.state.rate_limiter
    assert limiter.per_minute == 5
    # The limiter's clock is its seam: fixed, the one-minute window cannot roll over mid-test.
    now = [6000.0 + 15]
    limiter.clock = lambda: now[0]
    for _ in range(5):
        assert (await gw.client.get("/v1/chats", headers=alice.auth)).status_code == 200
    refused = await gw.client.post("/v1/chats", json={}, headers=alice.auth)
    assert_problem(refused, 429, alice.name, "5 requests")
    assert refused.headers["retry-after"] == "45"
    assert refused.headers["ratelimit-limit"] == "5"
    assert refused.headers["ratelimit-remaining"] == "0"
    assert refused.headers["ratelimit-reset"] == "45"
    assert refused.headers["ratelimit-policy"] == "5;w=60"
    # Per principal: bob is not slowed down by alice.
    assert (await gw.client.get("/v1/chats", headers=bob.auth)).status_code == 200
    # A refused request does not count; the next window starts afresh.
    now[0] += 45
    assert (await gw.client.get("/v1/chats", headers=alice.auth)).status_code == 200


async def test_stream_token_requests_count_against_their_principal(
    gateway_factory: GatewayFactory,
) -> None:
    (alice,) = new_tenants("alice")
    gw = await gateway_factory(api_keys=api_keys(alice), rate_limit_per_minute=3)
    limiter: RateLimiter = gw.app.state.rate_limiter
    limiter.clock = lambda: 6000.0
    chat_id = await create_chat(gw, alice)  # 1
    accepted = await ask_async(gw, alice, chat_id, "Do gift cards expire?")  # 2
    await stream_events(gw.client, "GET", accepted["stream_url"])  # 3, by token
    assert_problem(await request_head(gw, "GET", accepted["stream_url"]), 429)


# -- running answers ---------------------------------------------------------------------------


async def test_running_answers_per_principal_cap_is_429(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await llm_gateway_with(gateway_factory, upstream, alice, bob, max_turns_per_principal=1)
    upstream.set_scenario(**NEVER_ANSWERS)
    first_chat, second_chat = await create_chat(gw, alice), await create_chat(gw, alice)
    running = await ask_async(gw, alice, first_chat, "one")
    for mode in ("async", "sse", "wait"):
        refused = await request_head(
            gw,
            "POST",
            f"/v1/chats/{second_chat}/messages",
            json={"content": "two"},
            headers={**alice.auth, **ask_headers(mode)},
        )
        assert_problem(refused, 429, alice.name, "answers running")
        assert_retry_after(refused)
    assert await messages_of(gw, alice, second_chat) == []  # the refused question is not kept
    bobs = await ask_async(gw, bob, await create_chat(gw, bob), "mine")
    await cancel(gw, alice, running)
    again = await ask_async(gw, alice, second_chat, "two")  # the slot came back
    for accepted, tenant in ((bobs, bob), (again, alice)):
        await cancel(gw, tenant, accepted)


async def test_running_answers_global_cap_is_503(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    alice, bob, carol = new_tenants("alice", "bob", "carol")
    gw = await llm_gateway_with(gateway_factory, upstream, alice, bob, carol, max_turns=2)
    upstream.set_scenario(**NEVER_ANSWERS)
    running = [
        (tenant, await ask_async(gw, tenant, await create_chat(gw, tenant), "q"))
        for tenant in (alice, bob)
    ]
    carols = await create_chat(gw, carol)
    refused = await gw.client.post(
        f"/v1/chats/{carols}/messages", json={"content": "q"}, headers=carol.auth
    )
    assert_problem(refused, 503, "answers running")
    assert_retry_after(refused)
    assert await messages_of(gw, carol, carols) == []
    for tenant, accepted in running:
        await cancel(gw, tenant, accepted)


async def test_without_auth_the_answers_cap_is_the_global_one(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await llm_gateway_with(gateway_factory, upstream, max_turns=1, max_turns_per_principal=1)
    upstream.set_scenario(**NEVER_ANSWERS)
    first, second = await gw.create_chat(), await gw.create_chat()
    response = await gw.client.post(
        f"/v1/chats/{first}/messages", json={"content": "q"}, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202
    refused = await gw.client.post(f"/v1/chats/{second}/messages", json={"content": "q"})
    assert_problem(refused, 503, "answers running")
    await cancel(gw, None, response.json())


# -- open streams ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def held_stream(
    gateway: Gateway, method: str, url: str, *, headers: dict[str, str], json: Any = None
) -> AsyncIterator[dict[str, Any]]:
    """An SSE response kept open after its first event (`message.started`), which is yielded."""
    async with gateway.client.stream(
        method, url, json=json, headers={"Accept": "text/event-stream", **headers}
    ) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        events = EventSource(response).aiter_sse()
        try:
            first = await anext(events)
            assert first.event == "message.started"
            started: dict[str, Any] = json_loads(first.data)
            yield started
        finally:
            await events.aclose()


def json_loads(data: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(data)
    return value


async def test_open_streams_per_principal_cap_is_429_and_closing_frees_it(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    alice, bob = new_tenants("alice", "bob")
    gw = await llm_gateway_with(gateway_factory, upstream, alice, bob, max_streams_per_principal=1)
    upstream.set_scenario(**NEVER_ANSWERS)
    chat_id = await create_chat(gw, alice)
    async with held_stream(
        gw, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "q"}, headers=alice.auth
    ) as started:
        stream_url = f"/v1/chats/{chat_id}/messages/{started['id']}/stream"
        refused = await request_head(gw, "GET", stream_url, headers=alice.auth)
        assert_problem(refused, 429, alice.name, "streams")
        assert_retry_after(refused)
        bobs = await create_chat(gw, bob)
        async with held_stream(
            gw, "POST", f"/v1/chats/{bobs}/messages", json={"content": "q"}, headers=bob.auth
        ) as bobs_started:
            pass
    # Closed on the client side; the server frees the slot once it sees the disconnect.
    async with asyncio.timeout(10):
        while True:
            response = await request_head(gw, "GET", stream_url, headers=alice.auth)
            if response.status_code != 429:
                break
            await asyncio.sleep(0.05)
    assert response.status_code == 200
    for tenant, message in ((alice, started), (bob, bobs_started)):
        await cancel(gw, tenant, {"assistant_message": message})


async def test_open_streams_global_cap_is_503(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    alice, bob, carol = new_tenants("alice", "bob", "carol")
    gw = await llm_gateway_with(gateway_factory, upstream, alice, bob, carol, max_streams=2)
    upstream.set_scenario(**NEVER_ANSWERS)
    async with contextlib.AsyncExitStack() as stack:
        held = []
        for tenant in (alice, bob):
            chat_id = await create_chat(gw, tenant)
            url = f"/v1/chats/{chat_id}/messages"
            stream = held_stream(gw, "POST", url, json={"content": "q"}, headers=tenant.auth)
            held.append((tenant, await stack.enter_async_context(stream)))
        carols = await ask_async(gw, carol, await create_chat(gw, carol), "q")
        refused = await request_head(gw, "GET", carols["stream_url"])
        assert_problem(refused, 503, "streams")
        assert_retry_after(refused)
    for tenant, message in held:
        await cancel(gw, tenant, {"assistant_message": message})
    await cancel(gw, carol, carols)


async def test_an_sse_ask_over_the_stream_cap_starts_no_answer(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    """Refused is refused: no question stored, no answer running behind the client's back."""
    (alice,) = new_tenants("alice")
    gw = await llm_gateway_with(gateway_factory, upstream, alice, max_streams_per_principal=1)
    upstream.set_scenario(**NEVER_ANSWERS)
    first, second = await create_chat(gw, alice), await create_chat(gw, alice)
    async with held_stream(
        gw, "POST", f"/v1/chats/{first}/messages", json={"content": "q"}, headers=alice.auth
    ) as started:
        refused = await request_head(
            gw,
            "POST",
            f"/v1/chats/{second}/messages",
            json={"content": "over the cap"},
            headers={"Accept": "text/event-stream", **alice.auth},
        )
        assert_problem(refused, 429, "streams")
        stored = await messages_of(gw, alice, second)
    await cancel(gw, alice, {"assistant_message": started})
    for message in stored:
        if message["role"] == "assistant" and message["status"] == "streaming":
            await cancel(gw, alice, {"assistant_message": message})
    assert stored == []


# -- request size and history ------------------------------------------------------------------


async def test_bodies_over_the_limit_are_413(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_body_bytes=2048)
    chat_id = await gw.create_chat()
    url = f"/v1/chats/{chat_id}/messages"
    assert_problem(await gw.client.post(url, json={"content": "x" * 4000}), 413, "2048")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length to check up front
        yield b'{"content": "'
        for _ in range(8):
            yield b"y" * 512
        yield b'"}'

    response = await gw.client.post(
        url, content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 413, "2048")
    metadata = {f"k{i}": "v" * 200 for i in range(20)}
    assert_problem(await gw.client.post("/v1/chats", json={"metadata": metadata}), 413)
    assert await messages_of(gw, None, chat_id) == []
    # Just under the limit is fine.
    assert (await gw.client.post(url, json={"content": "x" * 1900})).status_code == 200


async def test_content_over_32000_characters_is_400(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(max_body_bytes=1_000_000)
    chat_id = await gw.create_chat()
    url = f"/v1/chats/{chat_id}/messages"
    assert_problem(await gw.client.post(url, json={"content": "x" * 32_001}), 400, "content")
    assert await messages_of(gw, None, chat_id) == []


EXCHANGES = [("question-1", "answer-001"), ("question-2", "answer-002")]  # 10 characters each
# Budgets that would split an exchange (10: a lone answer first) are left out: whether history
# may open with an answer is undecided (strict chat templates require user/assistant turns).


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (0, []),
        (9, []),
        (25, ["question-2", "answer-002"]),
        (40, ["question-1", "answer-001", "question-2", "answer-002"]),
        (10_000, ["question-1", "answer-001", "question-2", "answer-002"]),
    ],
)
async def test_the_history_sent_is_the_newest_that_fits_the_budget(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, budget: int, expected: list[str]
) -> None:
    gw = await llm_gateway_with(
        gateway_factory, upstream, history_budget_chars=budget, system_prompt="S"
    )
    chat_id = await gw.create_chat()
    for question, answer in EXCHANGES:
        upstream.set_scenario(text=answer)
        response = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": question})
        assert response.json()["content"] == answer
    latest = "latest " + "z" * 100  # longer than most budgets: the question itself always goes
    await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": latest})
    sent = [m["content"] for m in upstream.last_request()["messages"]]
    assert sent == ["S", *expected, latest]


async def test_an_answer_that_failed_empty_is_left_out_and_the_history_goes_on_past_it(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    # 28 characters: the newest exchange (20) and, past the empty answer, the question it
    # failed on (8) fit; the exchange before them does not.
    gw = await llm_gateway_with(
        gateway_factory, upstream, history_budget_chars=28, system_prompt="S"
    )
    chat_id = await gw.create_chat()
    asks = [("question-1", "answer-001"), ("broken-q", None), ("question-2", "answer-002")]
    for question, answer in asks:
        upstream.set_scenario(text=answer or "unused", fault="none" if answer else "http_500")
        response = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": question})
        assert response.json()["status"] == ("completed" if answer else "failed")
        assert response.json()["content"] == (answer or "")
    upstream.set_scenario(text="fine", fault="none")
    await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "latest"})
    sent = [m["content"] for m in upstream.last_request()["messages"]]
    assert sent == ["S", "broken-q", "question-2", "answer-002", "latest"]


# -- clients that stop reading, or never finish asking -----------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when it has none yet)."""
    found = sample_value(text, name, **labels)
    return 0.0 if found is None else found


async def non_reading_client(base_url: str, request: bytes) -> socket.socket:
    """A connection that sends `request` and then reads nothing (a plain socket: asyncio's
    streams would read into their own buffer behind the test's back); its receive buffer is
    small, so the server's writes back up."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    await loop.sock_sendall(sock, request)
    return sock


async def read_to_the_end(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 20):
        received += chunk
    return bytes(received)


def http_post(path: str, body: dict[str, Any], **headers: str) -> bytes:
    payload = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: test",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def test_a_client_that_stops_reading_is_dropped_and_the_answer_completes(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    gw = await llm_gateway_with(gateway_factory, upstream, sse_send_timeout_seconds=0.5)
    # More than the kernel's socket buffers hold (tcp_wmem's 4 MB at most, and loopback's
    # 64 KB segments let the send buffer grow that far): the gateway's send must block.
    big = Scenario(text=" ".join(f"{i:05d}" + "x" * 8000 for i in range(1000)))  # 8 MB
    upstream.set_scenario(text=big.text)
    chat_id = await gw.create_chat()
    sock = await non_reading_client(
        gw.base_url,
        http_post(
            f"/v1/chats/{chat_id}/messages",
            {"content": "Everything, please"},
            Accept="text/event-stream",
        ),
    )
    try:
        # Meanwhile the gateway serves others, to the end of their answers.
        other = await gw.create_chat()
        events = await stream_events(
            gw.client,
            "POST",
            f"/v1/chats/{other}/messages",
            json={"content": directive(text="A short answer.")},
        )
        assert deltas_text(events) == "A short answer."
        # The stuck stream is dropped after the send timeout...
        async with asyncio.timeout(15):
            while True:
                exposition = (await gw.client.get("/metrics")).text
                if metric(exposition, "sse_disconnects_total", reason="client") >= 1:
                    break
                await asyncio.sleep(0.05)
        assert metric(exposition, "sse_disconnects_total", reason="client") == 1
        assert metric(exposition, "sse_open_streams") == 0
        # ...while its answer runs on to the end and is stored whole.
        answers = [m for m in await messages_of(gw, None, chat_id) if m["role"] == "assistant"]
        row = await wait_for_status(db, answers[0]["id"])
        assert row["status"] == "completed"
        assert row["content"] == answer_text(big)
        # The client got part of the stream and then the end of the connection.
        async with asyncio.timeout(15):
            received = await read_to_the_end(sock)
        assert received.startswith(b"HTTP/1.1 200")
        assert b"event: message.completed" not in received
        assert len(received) < len(answer_text(big))
    finally:
        sock.close()


async def test_slowloris_headers_do_not_hold_up_other_requests(
    serve_factory: Callable[..., ServeProcess],
) -> None:
    """Twenty connections dribble their headers a byte at a time while ordinary requests run;
    those are served, and the slow ones are answered once their headers are complete."""
    proc = serve_factory()
    host, port = proc.base_url.removeprefix("http://").split(":")
    done = asyncio.Event()
    dribbling = [asyncio.Event() for _ in range(20)]

    async def slow_client(index: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n")
            for count in range(400):  # bounded: at most ~20 s of dribbling
                writer.write(b"X-Slow-" + str(count).encode() + b": ")
                for byte in b"abcdefgh":
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.005)  # the pace of the attack, not a wait for state
                writer.write(b"\r\n")
                dribbling[index].set()
                if done.is_set():
                    break
            writer.write(b"Connection: close\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(15):
                return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    slow = [asyncio.create_task(slow_client(i)) for i in range(20)]
    for started in dribbling:
        await started.wait()
    async with httpx.AsyncClient(base_url=proc.base_url, timeout=15) as client:
        chat_id = (await client.post("/v1/chats", json={"title": "while slow"})).json()["id"]
        answer = await client.post(f"/v1/chats/{chat_id}/messages", json={"content": "Tents?"})
        assert answer.status_code == 200, answer.text
        assert (await client.get("/health")).status_code == 200
        assert not any(task.done() for task in slow)  # they were still dribbling meanwhile
    done.set()
    for response in await asyncio.gather(*slow):
        assert response.startswith(b"HTTP/1.1 200"), response[:200]


# -- upstream timeouts -------------------------------------------------------------------------


async def test_a_stalled_upstream_ends_the_answer_interrupted_with_its_text(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    gw = await llm_gateway_with(gateway_factory, upstream, llm_idle_timeout_seconds=0.5)
    upstream.set_scenario(tokens=10, fault="stall", fault_after=3, stall_seconds=10)
    chat_id = await gw.create_chat()
    final = (await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "q"})).json()
    first_three = "".join(answer_tokens(Scenario(tokens=10))[:3])
    row = await wait_for_status(db, final["id"])
    for seen in (final, row):
        assert (seen["status"], seen["finish_reason"], seen["content"]) == (
            "interrupted",
            "upstream_idle_timeout",
            first_three,
        )


@contextlib.contextmanager
def unaccepting_listener() -> Iterator[str]:
    """A loopback port whose accept queue is full: connecting to it never completes."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(server.getsockname())
        fillers.append(filler)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


async def test_each_upstream_timeout_ends_the_answer_with_its_own_reason(
    gateway_factory: GatewayFactory, upstream: FakeUpstream, db: psycopg.AsyncConnection
) -> None:
    """Connect, first token, idle between tokens and total: each ends the answer
    `interrupted` with the reason that names it, keeping the text that came."""
    timeouts = {
        "llm_connect_timeout_seconds": 0.3,
        "llm_first_token_timeout_seconds": 0.5,
        "llm_idle_timeout_seconds": 0.5,
        "llm_total_timeout_seconds": 1.5,
    }
    ended: dict[str, dict[str, Any]] = {}
    with unaccepting_listener() as dead_url:
        gw = await gateway_factory(openai_base_url=dead_url, model="fake-model", **timeouts)
        chat_id = await gw.create_chat()
        response = await gw.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "q"})
        ended["upstream_connect_timeout"] = response.json()
    gw = await llm_gateway_with(gateway_factory, upstream, **timeouts)
    scenarios: dict[str, dict[str, Any]] = {
        "upstream_first_token_timeout": {"ttft_ms": 10_000},
        "upstream_idle_timeout": {"tokens": 10, "fault": "stall", "fault_after": 3},
        # Steady tokens (never idle for long) that would take 10 s in all.
        "upstream_total_timeout": {"tokens": 200, "tokens_per_second": 20},
    }
    for reason, scenario in scenarios.items():
        chat_id = await gw.create_chat()
        response = await gw.client.post(
            f"/v1/chats/{chat_id}/messages",
            json={"content": directive(stall_seconds=10, **scenario)},
        )
        ended[reason] = response.json()
    for reason, final in ended.items():
        assert (final["status"], final["finish_reason"]) == ("interrupted", reason), final
        row = await wait_for_status(db, final["id"])
        assert (row["status"], row["finish_reason"], row["content"]) == (
            "interrupted",
            reason,
            final["content"],
        )
    assert ended["upstream_idle_timeout"]["content"] == "".join(
        answer_tokens(Scenario(tokens=10))[:3]
    )
    full = answer_text(Scenario(tokens=200))
    partial = ended["upstream_total_timeout"]["content"]
    assert partial
    assert full.startswith(partial)
    assert partial != full
