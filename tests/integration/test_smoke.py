"""The quickest end-to-end check: create a chat, ask, watch the answer stream in."""

from __future__ import annotations

from tests.conftest import Gateway
from tests.sse import TERMINAL_EVENTS, deltas_text, stream_events


async def test_ask_streams_an_extractive_answer(gateway: Gateway) -> None:
    chat_id = await gateway.create_chat(title="smoke")
    events = await stream_events(
        gateway.client,
        "POST",
        f"/v1/chats/{chat_id}/messages",
        json={"content": "What is the security deposit for renting a tent?"},
    )
    names = [e.event for e in events]
    assert names[0] == "message.started"
    assert names[-1] == "message.completed"
    assert sum(n in TERMINAL_EVENTS for n in names) == 1
    assert events[0].data["user_message"]["content"].startswith("What is the security")
    final = events[-1].data
    assert deltas_text(events) == final["content"]
    assert "repairs-and-rentals.md" in {s["document"] for s in final["sources"]}
