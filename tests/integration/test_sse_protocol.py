"""The wire format of DESIGN.md's SSE protocol, read byte by byte."""

from __future__ import annotations

from bench.fake_upstream import FakeUpstream
from tests.conftest import GatewayFactory


async def test_headers_retry_ids_and_pings(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(
        openai_base_url=upstream.base_url, model="fake-model", sse_ping_seconds=0.1
    )
    # A pause before the first token long enough for a few pings.
    upstream.set_scenario(tokens=3, ttft_ms=450)
    chat_id = await gw.create_chat()
    async with gw.client.stream(
        "POST",
        f"/v1/chats/{chat_id}/messages",
        json={"content": "Hi"},
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        body = (await response.aread()).decode()
    blocks = [b for b in body.split("\n\n") if b.strip()]
    assert blocks[0].startswith("retry: 500\n")
    pings = [b for b in blocks if b.startswith(":")]
    assert pings
    assert all(b.strip() == ": ping" for b in pings)
    events = [b for b in blocks if not b.startswith(":")]
    # Every event but pings has an id, and the ids name this message and its offsets.
    ids = [
        line.removeprefix("id: ")
        for b in events
        for line in b.split("\n")
        if line.startswith("id: ")
    ]
    assert len(ids) == len(events) == 5
    tag = ids[0].split(".")[0]
    assert all(i.startswith(tag + ".") for i in ids)
    assert ids[-1].endswith(".end")
    offsets = [int(i.split(".")[1]) for i in ids]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0
