"""Splitting the upstream's SSE bytes into chunk payloads, however the reads fall."""

from __future__ import annotations

import pytest

from qna_gateway.llm import DataLines

STREAM = (
    b": keep-alive\n\n"
    b'data: {"a": 1}\n\n'
    b"event: message\n"
    b'data:{"b": 2}\n\n'
    b'data: {"c": "\xc3\xa9 \\n"}\n\n'
    b"data: [DONE]\n\n"
)
PAYLOADS = [b'{"a": 1}', b'{"b": 2}', b'{"c": "\xc3\xa9 \\n"}', b"[DONE]"]


def feed_all(reads: list[bytes]) -> list[bytes]:
    lines = DataLines()
    return [payload for read in reads for payload in lines.feed(read)]


def test_one_read() -> None:
    assert feed_all([STREAM]) == PAYLOADS


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
def test_any_split_between_reads(size: int) -> None:
    reads = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert feed_all(reads) == PAYLOADS


@pytest.mark.parametrize("ending", [b"\r\n", b"\r"])
def test_crlf_and_cr_line_ends(ending: bytes) -> None:
    stream = STREAM.replace(b"\n", ending)
    assert feed_all([stream]) == PAYLOADS
    assert feed_all([stream[i : i + 5] for i in range(0, len(stream), 5)]) == PAYLOADS


def test_an_unfinished_line_waits_for_its_end() -> None:
    lines = DataLines()
    assert lines.feed(b'data: {"a"') == []
    assert lines.feed(b": 1}\n") == [b'{"a": 1}']
