"""A finished request must be freed by reference counting alone.

Anything a request leaves in a reference cycle waits for Python's garbage collector, and a
collection stops the event loop for as long as it walks the heap: tens of ms with a few
hundred streams open, landing on every stream at once as added latency. Here the collector is
switched off while the gateway answers, so a request caught in a cycle stays in memory, and
the test finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bench.fake_upstream import FakeUpstream
from tests.conftest import Gateway
from tests.sse import stream_events


def request_cycles(port: int) -> int:
    """uvicorn's per-request objects, alive or unreachable, of the server on `port`."""
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, RequestResponseCycle) and (o.scope["server"] or ("", 0))[1] == port
    )


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    gc.collect()  # what earlier tests left
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_answered_and_refused_requests_leave_no_reference_cycle(
    llm_gateway: Gateway,
) -> None:
    port = urlsplit(llm_gateway.base_url).port
    assert port is not None
    with collector_off():
        async with httpx.AsyncClient(base_url=llm_gateway.base_url, timeout=30) as client:
            created = await client.post("/v1/chats", json={})
            assert created.status_code == 201, created.text
            chat = created.json()["id"]
            events = await stream_events(
                client, "POST", f"/v1/chats/{chat}/messages", json={"content": "Tent deposit?"}
            )
            assert events[-1].event == "message.completed"
            assert (await client.get(f"/v1/chats/{chat}/messages")).status_code == 200
            refused = await client.post(
                f"/v1/chats/{chat}/messages",
                content=b"{not json",
                headers={"Content-Type": "application/json"},
            )
            assert refused.status_code == 400
            # The open keep-alive connection still holds its last request: the check below
            # looks at real objects, not at a server that never made any.
            assert request_cycles(port) >= 1
        await all_freed(port)


async def test_paced_fake_upstream_streams_leave_no_reference_cycle() -> None:
    # The benchmark's instrument: a collection there would show up as gateway latency.
    async with FakeUpstream(tokens=5, tokens_per_second=500, ttft_ms=0) as upstream:
        with collector_off():
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(
                    upstream.base_url + "/chat/completions",
                    json={
                        "model": "fake-model",
                        "stream": True,
                        "messages": [{"role": "user", "content": "Tent deposit?"}],
                    },
                )
                assert response.status_code == 200
                assert response.text.endswith("data: [DONE]\n\n")
                assert request_cycles(upstream.port) >= 1
            await all_freed(upstream.port)


async def all_freed(port: int) -> None:
    """The client has closed its connections: once the server has seen them go, nothing of
    theirs may be left, since nothing but reference counting can free it now."""
    for _ in range(100):
        if (left := request_cycles(port)) == 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"{left} finished requests of the server on port {port} are still in memory with the"
        " collector off: something holds them in a reference cycle"
    )
