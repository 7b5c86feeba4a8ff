"""SSE load generator: open-loop or fixed-concurrency streams, every chunk timestamped on arrival.

Run as its own process (`python -m bench.loadgen --help`). It speaks raw HTTP/1.1 over asyncio
protocols (one connection per stream, chunked bodies decoded by hand, a minimal SSE splitter)
because an HTTP client library costs more per chunk than the servers being measured.

Targets: `openai` counts `data:` chunks whose delta carries non-empty content (the fake upstream
directly, or an OpenAI-compatible proxy: LiteLLM, the FastAPI relay); `gateway` asks qna-gateway
(`POST /v1/chats/{id}/messages`, one pre-created chat per stream) and counts `message.delta`.
Every request carries `[[fake:{"seed": n}]]`, so stream n of every target gets the same
upstream timing and the figures can be compared stream for stream.

Output: one JSON line per stream, then one `window` line (histograms of inter-chunk gaps and of
chunk lateness against the fake upstream's own schedule); the window line is also printed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from bench.fake_upstream import PACED, Scenario, directive
from bench.sse_wire import StreamProtocol, StreamResult, Target, Window, paced_schedule
from bench.stats import Histogram, percentile

QUESTION: Final = "What is the security deposit for renting a tent?"
# About the size of the gateway's own system prompt, so every target sends a similar request.
SYSTEM_PROMPT: Final = (
    "You are the support assistant of an outdoor retailer. Answer from the knowledge base, "
    "cite the documents you used, and say so when you do not know."
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run: where, how many, how fast."""

    target: Target
    url: str
    label: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    chats: tuple[str, ...] = ()
    model: str = "fake-model"
    question: str = QUESTION
    concurrency: int = 1
    streams_per_worker: int = 1
    ramp: float = 0.0
    rate: float = 0.0  # > 0: open loop, `rate` arrivals per second for `duration` seconds
    duration: float = 0.0
    # Streams with an index in [measure_from, measure_to) are measured; by default all.
    measure_from: int = 0
    measure_to: int | None = None
    expected_chunks: int = 300
    deadline: float = 60.0
    seed_base: int = 0
    schedule: Scenario | None = None
    fake: dict[str, object] = field(default_factory=dict)  # more fake-upstream directive fields

    @property
    def open_loop(self) -> bool:
        return self.rate > 0

    @property
    def streams(self) -> int:
        if self.open_loop:
            return max(1, round(self.rate * self.duration))
        return self.concurrency * self.streams_per_worker

    def measured(self, index: int) -> bool:
        return self.measure_from <= index and (self.measure_to is None or index < self.measure_to)


def _request(plan: Plan, index: int, seed: int) -> bytes:
    parts = urlsplit(plan.url)
    host = parts.netloc
    content = f"{plan.question} {directive(**plan.fake, seed=seed)}"
    if plan.target == "gateway":
        base = parts.path.rstrip("/")
        path = f"{base}/v1/chats/{plan.chats[index]}/messages"
        body = json.dumps({"content": content}).encode()
    else:
        path = parts.path or "/v1/chat/completions"
        body = json.dumps(
            {
                "model": plan.model,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": content},
                ],
            }
        ).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "Accept: text/event-stream",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in plan.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class LoadGenerator:
    """Runs one plan and keeps every stream's result."""

    def __init__(self, plan: Plan) -> None:
        if plan.target == "gateway" and len(plan.chats) < plan.streams:
            raise ValueError(f"{plan.streams} gateway streams need as many chats")
        parts = urlsplit(plan.url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only http:// URLs are supported: {plan.url}")
        self.plan = plan
        self._host = parts.hostname
        self._port = parts.port or 80
        mode = "open" if plan.open_loop else "fixed"
        self.window = Window(plan.label, plan.target, mode, plan.concurrency, plan.streams)
        # Where an unmeasured stream's gaps and lateness go: a window nobody reads.
        self._unmeasured = Window("", plan.target, mode, 0, 0)
        self.results: list[StreamResult] = []
        self._t0 = 0.0
        self._protocols: set[StreamProtocol] = set()

    async def _one(self, index: int) -> None:
        plan = self.plan
        seed = plan.seed_base + index
        result = StreamResult(index=index, seed=seed, expected=plan.expected_chunks)
        result.measured = plan.measured(index)
        window = self.window if result.measured else self._unmeasured
        self.results.append(result)
        schedule = paced_schedule(plan.schedule, seed) if plan.schedule is not None else None
        if schedule:
            result.sched_ttft = schedule[0]
        request = _request(plan, index, seed)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        result.start = started - self._t0
        result.begun = started

        def factory() -> StreamProtocol:
            return StreamProtocol(request, plan.target, result, window, schedule, started)

        protocol: StreamProtocol | None = None
        try:
            _, protocol = await loop.create_connection(factory, self._host, self._port)
            self._protocols.add(protocol)
            await protocol.done
        except OSError as exc:
            result.error = f"connect: {exc}"
        finally:
            if protocol is not None:
                self._protocols.discard(protocol)
                if protocol.transport is not None:
                    protocol.transport.close()

    async def _fixed(self) -> None:
        plan = self.plan
        counter = iter(range(plan.streams))

        async def worker(delay: float) -> None:
            await asyncio.sleep(delay)
            for _ in range(plan.streams_per_worker):
                await self._one(next(counter))

        n = plan.concurrency
        delays = [plan.ramp * i / n for i in range(n)]
        await asyncio.gather(*(worker(d) for d in delays))

    async def _open(self) -> None:
        plan = self.plan
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        try:
            for index in range(plan.streams):
                delay = self._t0 + index / plan.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(loop.create_task(self._one(index)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # the deadline: stop the streams still running
                task.cancel()

    async def run(self) -> Window:
        cpu0 = time.process_time()
        self._t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.plan.deadline):
                await (self._open() if self.plan.open_loop else self._fixed())
        except TimeoutError:
            for protocol in list(self._protocols):
                if protocol.transport is not None:
                    protocol.transport.abort()
        window = self.window
        window.wall = time.perf_counter() - self._t0
        window.loadgen_cpu = time.process_time() - cpu0
        self._account()
        return window

    def _account(self) -> None:
        window = self.window
        started = {r.index for r in self.results}
        # Streams the deadline kept from starting count as failed too.
        for index in range(self.plan.streams):
            if index not in started:
                result = StreamResult(
                    index=index, seed=self.plan.seed_base + index, error="not started"
                )
                result.measured = self.plan.measured(index)
                self.results.append(result)
        for r in self.results:
            if r.error is None and r.duration is None:
                r.error = "deadline"
            if r.error is None and r.chunks != r.expected:
                window.mismatched += 1
            window.chunks += r.chunks
            window.errors += r.error is not None
        ttfts = [r.ttft for r in self.results if r.ttft is not None and r.measured]
        window.ttft_p50 = percentile(ttfts, 50)
        window.ttft_p99 = percentile(ttfts, 99)

    def write(self, path: Path) -> None:
        with path.open("w") as out:
            for r in sorted(self.results, key=lambda r: r.index):
                out.write(json.dumps({"kind": "stream", **asdict(r)}) + "\n")
            out.write(json.dumps(window_json(self.window)) + "\n")


def window_json(window: Window) -> dict[str, object]:
    data: dict[str, object] = {"kind": "window"}
    for item in fields(window):
        value = getattr(window, item.name)
        data[item.name] = value.to_json() if isinstance(value, Histogram) else value
    return data


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument(
        "--url",
        required=True,
        help="openai: the chat/completions URL; gateway: the gateway's root URL",
    )
    parser.add_argument("--target", choices=("openai", "gateway"), default="openai")
    parser.add_argument("--label", default="")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    parser.add_argument("--chats-file", type=Path, help="gateway: one chat id per line")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--streams-per-worker", type=int, default=1)
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds to start all workers")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: arrivals/second")
    parser.add_argument("--duration", type=float, default=0.0, help="open loop: seconds")
    parser.add_argument(
        "--measure",
        default="",
        help="FROM:TO: only streams with an index in [FROM, TO) feed TTFT and gaps",
    )
    parser.add_argument("--expected-chunks", type=int, default=300)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument(
        "--schedule",
        choices=("paced", "none"),
        default="none",
        help="paced: measure chunk lateness against the PACED preset's seeded schedule",
    )
    parser.add_argument(
        "--fake",
        type=json.loads,
        default={},
        help="more directive fields for the fake upstream, as JSON (e.g. '{\"tokens\": 1}')",
    )
    parser.add_argument("--out", type=Path, help="JSON lines: one per stream, then the window")
    parser.add_argument(
        "--control",
        action="store_true",
        help="print READY, wait for a line on stdin, then run (lets a harness bracket the run)",
    )
    return parser.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    headers = []
    for raw in args.header:
        name, sep, value = raw.partition(":")
        if not sep:
            raise ValueError(f"--header {raw!r} is not 'Name: value'")
        headers.append((name.strip(), value.strip()))
    measure_from, measure_to = 0, None
    if args.measure:
        first, sep, last = args.measure.partition(":")
        if not sep:
            raise ValueError(f"--measure {args.measure!r} is not FROM:TO")
        measure_from, measure_to = int(first or 0), int(last) if last else None
    chats: tuple[str, ...] = ()
    if args.chats_file is not None:
        chats = tuple(line.strip() for line in args.chats_file.read_text().splitlines() if line)
    return Plan(
        target=args.target,
        url=args.url,
        label=args.label,
        headers=tuple(headers),
        chats=chats,
        model=args.model,
        question=args.question,
        concurrency=max(1, args.concurrency),
        streams_per_worker=max(1, args.streams_per_worker),
        ramp=max(0.0, args.ramp),
        rate=max(0.0, args.rate),
        duration=max(0.0, args.duration),
        measure_from=measure_from,
        measure_to=measure_to,
        expected_chunks=args.expected_chunks,
        deadline=args.deadline,
        seed_base=args.seed_base,
        schedule=PACED if args.schedule == "paced" else None,
        fake=dict(args.fake),
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: cheaper per chunk, and what the measured servers run on."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        generator = LoadGenerator(plan_from_args(args))
    except (ValueError, OSError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    if args.control:
        print("READY", flush=True)
        sys.stdin.readline()
    # No collection during the run: one would hold up the timestamps of every open stream at
    # once. A run makes next to no cyclic garbage, and the process ends with it.
    gc.collect()
    gc.freeze()
    gc.disable()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        window = runner.run(generator.run())
    if args.out is not None:
        generator.write(args.out)
    print(json.dumps(window_json(window)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
