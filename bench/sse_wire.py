"""The load generator's client side of one stream: raw HTTP/1.1 and SSE, every chunk timed.

One `StreamProtocol` per connection sends the request, reads the status line and headers,
decodes a chunked body by hand and splits it into SSE events. A content chunk is a
`message.delta` event (gateway) or a `data:` chunk whose delta has non-empty content
(OpenAI format). Timing goes into the stream's `StreamResult` and the window's histograms.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from typing import Final, Literal, cast

from bench.fake_upstream import Scenario
from bench.stats import Histogram

Target = Literal["openai", "gateway"]

_CONTENT: Final = re.compile(rb'"content":\s*"[^"]')
_GATEWAY_END: Final = re.compile(
    rb"event: (message\.(?:completed|failed|cancelled|interrupted)|reconnect)"
)


@dataclass(slots=True)
class StreamResult:
    """What one stream saw. Times are seconds from the stream's start (before connecting)."""

    index: int
    seed: int
    start: float = 0.0  # seconds since the window began
    begun: float = 0.0  # the same moment on the machine's monotonic clock (perf_counter)
    port: int = 0  # the connection's local port, which the gateway's timeline hook sees too
    status: int = 0
    ttft: float | None = None
    sched_ttft: float | None = None  # when the upstream's schedule put the first chunk
    chunks: int = 0
    expected: int = 0
    events: int = 0
    reads: int = 0
    gap_max: float = 0.0
    late_max: float = 0.0
    duration: float | None = None
    error: str | None = None
    # False for the streams of a held window that only keep the others company (before and
    # after the measured ones): they count for errors and chunks, not for TTFT or gaps.
    measured: bool = True


@dataclass(slots=True)
class Window:
    """The whole run's counters and histograms, written as the last line."""

    label: str
    target: str
    mode: str
    concurrency: int
    streams: int
    wall: float = 0.0
    chunks: int = 0
    errors: int = 0
    mismatched: int = 0
    loadgen_cpu: float = 0.0
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    gaps: Histogram = field(default_factory=Histogram)
    lateness: Histogram = field(default_factory=Histogram)


def paced_schedule(scenario: Scenario, seed: int) -> list[float]:
    """When the fake upstream sends each content chunk of a seeded request, from its arrival.

    Mirrors its pacing: a jittered TTFT, then a schedule (not sleep-after-send) of jittered
    periods, drawn in that order from `random.Random(seed)`.
    """
    rng = random.Random(seed)
    base, jitter_ms = scenario.ttft_ms, scenario.ttft_jitter_ms
    first = max(0.0, base + rng.uniform(-jitter_ms, jitter_ms) if jitter_ms else base) / 1000
    period = 1 / scenario.tokens_per_second if scenario.tokens_per_second > 0 else 0.0
    jitter = scenario.gap_jitter_ms / 1000
    offsets = [first]
    at = first
    for _ in range(1, scenario.tokens):
        if period:
            at += max(0.0, period + rng.uniform(-jitter, jitter)) if jitter else period
        offsets.append(at)
    return offsets


class StreamProtocol(asyncio.Protocol):
    """One streaming request: send it, parse the response, timestamp each content chunk."""

    def __init__(
        self,
        request: bytes,
        target: Target,
        result: StreamResult,
        window: Window,
        schedule: list[float] | None,
        started: float,
    ) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._request = request
        self._gateway = target == "gateway"
        self._result = result
        self._gaps = window.gaps
        self._lateness = window.lateness
        self._schedule = schedule
        self._started = started
        self._last = 0.0
        self._head = bytearray()
        self._in_head = True
        self._chunked = False
        self._raw = bytearray()
        self._need = 0  # bytes of chunk data still to come
        self._skip = 0  # bytes of the CRLF after a chunk still to drop
        self._sse = bytearray()
        self._error_body = bytearray()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sockname = self.transport.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            self._result.port = int(sockname[1])
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._result.reads += 1
        if self._in_head:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = bytes(self._head[end + 4 :])
            self._parse_head(bytes(self._head[:end]))
            if self.done.done():
                return
        if self._result.status != 200:
            self._error_body += data
            return
        if self._chunked:
            body = self._one_chunk(data) if not (self._raw or self._need or self._skip) else None
            if body is None:
                self._raw += data
                body = self._dechunk()
        else:
            body = data
        if not body:
            return
        if not self._sse and body.endswith(b"\n\n") and body.find(b"\n\n") == len(body) - 2:
            self._on_event(body[:-2], now)  # the usual case: one whole event in one read
        else:
            self._sse += body
            self._split_events(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            result = self._result
            if result.status and result.status != 200:
                detail = bytes(self._error_body[:160]).decode("utf-8", "replace")
                result.error = f"http {result.status}: {detail}"
            elif result.error is None:
                result.error = f"closed before the end ({exc or 'eof'})"
            self.done.set_result(None)

    # -- parsing -------------------------------------------------------------------------------

    def _parse_head(self, head: bytes) -> None:
        self._in_head = False
        status_line, _, headers = head.partition(b"\r\n")
        try:
            self._result.status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError):
            self._finish(f"bad status line {status_line[:80]!r}")
            return
        self._chunked = b"transfer-encoding: chunked" in headers.lower()

    @staticmethod
    def _one_chunk(data: bytes) -> bytes | None:
        """The payload when `data` is exactly one whole HTTP chunk (the usual read); else None."""
        eol = data.find(b"\r\n")
        if eol <= 0:
            return None
        try:
            size = int(data[:eol], 16)
        except ValueError:
            return None
        if size == 0 or len(data) != eol + size + 4:
            return None
        return data[eol + 2 : eol + 2 + size]

    def _dechunk(self) -> bytes:
        raw = self._raw
        out = bytearray()
        pos = 0
        size = len(raw)
        while pos < size:
            if self._skip:
                take = min(self._skip, size - pos)
                self._skip -= take
                pos += take
                continue
            if self._need:
                take = min(self._need, size - pos)
                out += raw[pos : pos + take]
                self._need -= take
                pos += take
                if not self._need:
                    self._skip = 2
                continue
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            length = int(bytes(raw[pos:eol]).split(b";", 1)[0], 16)
            pos = eol + 2
            if length == 0:
                pos = size  # the last chunk: the trailer is of no interest
                break
            self._need = length
        del raw[:pos]
        return bytes(out)

    def _split_events(self, now: float) -> None:
        buf = self._sse
        start = 0
        while not self.done.done():
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._on_event(bytes(buf[start:end]), now)
            start = end + 2
        if start:
            del buf[:start]

    def _on_event(self, block: bytes, now: float) -> None:
        result = self._result
        result.events += 1
        if self._gateway:
            data_at = block.find(b"data: ")
            head = block if data_at < 0 else block[:data_at]
            if b"event: message.delta" in head:
                self._on_chunk(now)
            else:
                end = _GATEWAY_END.search(head)
                if end is not None:
                    kind = end.group(1).decode()
                    self._finish(None if kind == "message.completed" else kind)
            return
        if not block.startswith(b"data: "):
            return
        if block == b"data: [DONE]":
            self._finish(None)
        elif _CONTENT.search(block) is not None:
            self._on_chunk(now)
        elif block.startswith(b'data: {"error"'):
            self._finish("error chunk: " + block[6:160].decode("utf-8", "replace"))

    def _on_chunk(self, now: float) -> None:
        result = self._result
        since = now - self._started
        if result.chunks == 0:
            result.ttft = since
        else:
            gap = now - self._last
            self._gaps.add(gap)
            if gap > result.gap_max:
                result.gap_max = gap
        schedule = self._schedule
        if schedule is not None and result.chunks < len(schedule):
            late = since - schedule[result.chunks]
            self._lateness.add(late if late > 0 else 0.0)
            if late > result.late_max:
                result.late_max = late
        self._last = now
        result.chunks += 1

    def _finish(self, error: str | None) -> None:
        result = self._result
        result.duration = time.perf_counter() - self._started
        result.error = error
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()
