"""Reading SSE responses in tests, through httpx-sse (an SSE client library)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import EventSource

TERMINAL_EVENTS = {
    "message.completed",
    "message.failed",
    "message.cancelled",
    "message.interrupted",
}


@dataclass
class Event:
    event: str
    id: str
    data: Any


def deltas_text(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "message.delta")


async def read_events(response: httpx.Response, *, limit: int | None = None) -> list[Event]:
    """Events until the stream ends (or `limit` events); pings are skipped."""
    assert response.status_code == 200, response.status_code
    assert response.headers["content-type"].startswith("text/event-stream")
    events: list[Event] = []
    async for sse in EventSource(response).aiter_sse():
        events.append(Event(sse.event, sse.id, json.loads(sse.data) if sse.data else None))
        if limit is not None and len(events) >= limit:
            break
    return events


async def stream_events(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    limit: int | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Event]:
    all_headers = {"Accept": "text/event-stream", **(headers or {})}
    async with client.stream(method, url, headers=all_headers, **kwargs) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"{response.status_code}: {response.text}")
        return await read_events(response, limit=limit)
