"""The fake upstream's paced streams, sent from timer callbacks: every chunk arrives, in order,
on time or, for a client that stopped reading, once it reads again."""

from __future__ import annotations

import asyncio
import time

import httpx
import msgspec

from bench.fake_upstream import FakeUpstream, answer_tokens

REQUEST = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


async def content_chunks(response: httpx.Response) -> tuple[list[str], bool]:
    texts: list[str] = []
    done = False
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            chunk = msgspec.json.decode(line[6:])
            for choice in chunk.get("choices") or ():
                if choice["delta"].get("content"):
                    texts.append(choice["delta"]["content"])
    return texts, done


async def test_a_paced_stream_keeps_its_schedule(upstream: FakeUpstream) -> None:
    scenario = upstream.set_scenario(
        tokens=20, tokens_per_second=50, ttft_ms=0, ttft_jitter_ms=0, gap_jitter_ms=0
    )
    async with httpx.AsyncClient(base_url=upstream.base_url) as client:
        started = time.monotonic()
        async with client.stream("POST", "/chat/completions", json=REQUEST) as response:
            texts, done = await content_chunks(response)
        took = time.monotonic() - started
    assert (texts, done) == (answer_tokens(scenario), True)
    # 19 periods of 20 ms: paced, not sent at once (no upper bound: the machine may be slow).
    assert took >= 0.38


async def test_a_client_that_stops_reading_gets_every_chunk_when_it_reads_again(
    upstream: FakeUpstream,
) -> None:
    # Some MB at a period of 10 µs: the server's buffer fills while the client sleeps, so
    # its sends wait and a task finishes them.
    scenario = upstream.set_scenario(
        tokens=30_000, tokens_per_second=100_000, ttft_ms=0, ttft_jitter_ms=0, gap_jitter_ms=0
    )
    async with (
        httpx.AsyncClient(base_url=upstream.base_url, timeout=60) as client,
        client.stream("POST", "/chat/completions", json=REQUEST) as response,
    ):
        await asyncio.sleep(1.0)
        texts, done = await content_chunks(response)
    assert done
    assert texts == answer_tokens(scenario)
    stats = upstream.stats()
    assert stats["completed"] == 1
    assert stats["disconnects"] == 0
