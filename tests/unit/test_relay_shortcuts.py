"""The per-token shortcuts give what the general paths give: the upstream's reads however they
fall, and the SSE bytes of a text event with or without a hint or tool events before it."""

from __future__ import annotations

import time
import uuid

import msgspec
import pytest

from qna_gateway.llm import _Round, _RoundReader, _Watchdog
from qna_gateway.streams import Position, _Cursor, event_id, sse

TOKENS = ["Hel", "lo, ", "wor", "ld\n", '"é"']


def chunk(text: str) -> bytes:
    body = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


CHUNKS = [chunk(t) for t in TOKENS] + [b"data: [DONE]\n\n"]
STREAM = b"".join(CHUNKS)


def read_all(reads: list[bytes]) -> tuple[list[str], bool]:
    texts: list[str] = []
    now = time.monotonic()
    watchdog = _Watchdog(first_token=30, idle=30, started=now, deadline=now + 60)
    reader = _RoundReader(_Round(), texts.append, watchdog)
    try:
        for data in reads:
            if reader.feed(data):
                break
    finally:
        watchdog.close()
    assert reader.error is None
    return texts, reader.done


@pytest.mark.parametrize(
    "reads",
    [
        CHUNKS,  # one chunk per read: the shortcut
        [STREAM],  # all at once: the general path
        [STREAM[i : i + 7] for i in range(0, len(STREAM), 7)],  # split mid-line
        [c.replace(b"\n", b"\r\n") for c in CHUNKS],  # CRLF: the general path
        [CHUNKS[0] + CHUNKS[1][:9], CHUNKS[1][9:], *CHUNKS[2:]],  # a line left over, then whole
    ],
    ids=["per-chunk", "whole", "split", "crlf", "leftover"],
)
async def test_the_round_reader_gets_the_same_text_however_the_reads_fall(
    reads: list[bytes],
) -> None:
    assert read_all(reads) == (TOKENS, True)


class Sink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def emit(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    async def drained(self) -> None:
        pass


def delta(message_id: uuid.UUID, end: int, text: str, tools: int = 0) -> bytes:
    data = msgspec.json.encode({"text": text})
    return sse("message.delta", event_id(message_id, end, tools), data)


@pytest.mark.parametrize("tools", [0, 2])
def test_text_events_are_the_same_bytes_on_the_short_path(tools: int) -> None:
    message_id = uuid.uuid4()
    sink = Sink()
    cursor = _Cursor(message_id, sink, b"retry: 500\n", Position(0, tools))
    start = 0
    for text in TOKENS:
        cursor.text(start, text)
        start += len(text)
    expected, end = [], 0
    for text in TOKENS:
        end += len(text)
        expected.append(delta(message_id, end, text, tools))
    expected[0] = b"retry: 500\n" + expected[0]
    assert sink.chunks == expected
