"""`python -m bench.profile_gateway`: where the gateway spends its CPU while relaying streams.

Starts the same stack as `bench.run` (without its peers), runs one window of paced (default) or
zero-delay streams through the gateway, and samples the gateway with py-spy meanwhile
(non-blocking, pinned to the load core). Writes bench/results/profile.svg (flame graph),
profile.txt (collapsed stacks) and profile.md (the hottest functions and areas).

With `--count-calls` it counts instead of sampling: cProfile runs in the gateway for the window
only (switched by SIGUSR1, see bench/callcount/) and profile-calls.md says how many calls, and
which, each relayed token cost. Counts do not drift with the machine as CPU seconds do on a
shared VM, so they compare two refs where timings cannot.

With `--stalls` it watches the event loop instead (bench/stallwatch/): how late the loop ran a
callback due every millisecond, and the main thread's stack sampled only while the loop was
late by more than `--stall-ms`; profile-stalls.md says what holds up the tail of the latency,
which a profiler weighing every busy moment alike does not.

With `--timeline` it stamps each ask on its way through the gateway instead (bench/timeline/),
after a window of the bare upstream at the same level: profile-timeline.md says how much of
the added time to first token the gateway spends, and where, and what the hops outside it take.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from bench.options import RESULTS, options_from_args
from bench.procs import pinned
from bench.run import Bench, WindowRecord
from bench.stats import percentile

CALLCOUNT_HOOK: Final = Path(__file__).parent / "callcount"
STALLWATCH_HOOK: Final = Path(__file__).parent / "stallwatch"
TIMELINE_HOOK: Final = Path(__file__).parent / "timeline"

# Where a frame's file lives → the area of the stack it belongs to (first match wins).
AREAS: Final = (
    ("openai/", "openai client (SSE decode, chunk models)"),
    ("httpx2/", "httpx2 / httpcore2 (upstream HTTP)"),
    ("httpcore2/", "httpx2 / httpcore2 (upstream HTTP)"),
    ("pydantic", "pydantic (chunk models)"),
    ("qna_gateway/sse.py", "gateway: sse.py (event stream response)"),
    ("litestar/", "Litestar (routing, DI, request/response)"),
    ("uvicorn/", "uvicorn (HTTP protocol)"),
    ("psycopg_pool/", "psycopg pool"),
    ("psycopg/", "psycopg (queries, NOTIFY)"),
    ("prometheus_client/", "prometheus-client"),
    ("opentelemetry/", "OpenTelemetry"),
    ("qna_gateway/streams.py", "gateway: streams.py (SSE events)"),
    ("qna_gateway/turns.py", "gateway: turns.py (relay, batching)"),
    ("qna_gateway/llm.py", "gateway: llm.py (upstream loop)"),
    ("qna_gateway/pubsub.py", "gateway: pubsub.py (LISTEN/NOTIFY)"),
    ("qna_gateway/middleware.py", "gateway: middleware.py"),
    ("qna_gateway/store/", "gateway: store/ (SQL)"),
    ("qna_gateway/", "gateway: other modules"),
    ("logging/", "logging"),
    ("json/", "json"),
    ("asyncio/", "asyncio (tasks, queues, timers)"),
)


def _stem(phase: str) -> str:
    return "profile" if phase == "paced" else f"profile-{phase}"


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def _area(frame: str) -> str | None:
    for needle, name in AREAS:
        if needle in frame:
            return name
    return None


def hotspots(
    stacks: list[tuple[list[str], int]],
    top: int = 25,
    samples: str = "busy samples (py-spy, idle time excluded)",
) -> str:
    total = sum(n for _, n in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for frames, n in stacks:
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        # A sample belongs to the innermost frame that has an area: who is doing the work.
        for frame in reversed(frames):
            area = _area(frame)
            if area is not None:
                areas[area] += n
                break
        else:
            areas["other (interpreter, C code)"] += n

    def table(title: str, counts: Counter[str], limit: int) -> list[str]:
        rows = [f"| {title} | share of busy samples |", "|---|---:|"]
        rows += [f"| `{name}` | {n / total:.1%} |" for name, n in counts.most_common(limit)]
        return rows

    parts = [
        f"{total} {samples}.",
        "",
        "### By area (the innermost frame that belongs to a known package or module)",
        "",
        *table("area", areas, 30),
        "",
        "### Functions, self time",
        "",
        *table("function", own, top),
        "",
        "### Functions, inclusive time",
        "",
        *table("function", inclusive, top),
    ]
    return "\n".join(parts).replace("| `", "| ").replace("` |", " |")


async def _profile(args: argparse.Namespace, work: Path) -> str:
    levels = ["--levels", str(args.streams), "--zero-levels", ""]
    if args.phase != "paced":
        levels = ["--levels", "", "--zero-levels", str(args.streams)]
    options = options_from_args(
        ["--no-litellm", "--no-relay", "--rounds", "1", *levels, *args.passthrough]
    )
    stats_path = work / "calls.prof"
    stalls_path = work / "stalls.json"
    timeline_path = work / "timeline.json"
    if args.count_calls:
        options.gateway_env["PYTHONPATH"] = str(CALLCOUNT_HOOK)
        options.gateway_env["QNA_BENCH_CPROFILE"] = str(stats_path)
    elif args.timeline:
        options.gateway_env["PYTHONPATH"] = str(TIMELINE_HOOK)
        options.gateway_env["QNA_BENCH_TIMELINE"] = str(timeline_path)
    elif args.stalls:
        options.gateway_env["PYTHONPATH"] = str(STALLWATCH_HOOK)
        options.gateway_env["QNA_BENCH_STALLS"] = str(stalls_path)
        options.gateway_env["QNA_BENCH_STALL_MS"] = str(args.stall_ms)
    bench = Bench(options, work)
    try:
        await bench.start()
        await bench.describe()
        await bench.prepare_chats()
        await bench.warm_up()
        assert bench.upstream is not None
        assert bench.gateway is not None
        if args.phase == "paced":
            await bench.upstream.use_paced()
        if args.phase == "ask":
            # The request path alone: one question after another, one-token answers.
            record = WindowRecord(
                0,
                "zero",
                0,
                1,
                "gateway",
                streams_per_worker=args.streams,
                fake={"tokens": 1},
                expected_chunks=1,
            )
        else:
            record = WindowRecord(0, args.phase, 0, args.streams, "gateway")
        # Every chat the window needs exists before sampling starts.
        await bench.ensure_chats(record.level * record.streams_per_worker)
        await bench.wait_quiet()
        if args.count_calls:
            await _toggled_window(bench, record, stats_path)
            return _calls_report(args, bench, record, stats_path)
        if args.timeline:
            # The bare upstream's window first: the added TTFT the stamps are set against.
            floor = WindowRecord(1, args.phase, 0, args.streams, "upstream")
            await bench.run_window(floor)
            await bench.wait_quiet()
            await _toggled_window(bench, record, timeline_path)
            return _timeline_report(args, bench, record, floor, timeline_path)
        if args.stalls:
            await _toggled_window(bench, record, stalls_path)
            return _stalls_report(args, bench, record, stalls_path)
        pid = str(bench.gateway.service.pid)
        out = args.out_dir
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        common = [py_spy, "record", "--pid", pid, "--rate", str(args.rate), "--nonblocking"]
        stem = _stem(args.phase)
        outputs = (
            ["-F", "-o", str(out / f"{stem}.svg")],
            ["--nolineno", "-f", "raw", "-o", str(out / f"{stem}.txt")],
        )
        samplers = [
            await asyncio.create_subprocess_exec(
                *pinned([*common, *output], bench.pin_load),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            for output in outputs
        ]
        await asyncio.sleep(1.0)  # let py-spy attach before the load starts
        await bench.run_window(record)
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        for sampler in samplers:
            await sampler.wait()
    finally:
        await bench.stop()
    window = record.loadgen
    chunks = int(window.get("chunks", 0) or 0)
    cpu = record.cpu.get("gateway", 0.0)
    loops = bench.meta.get("event_loops", {}).get("gateway", {})
    stem = _stem(args.phase)
    stacks = parse_collapsed((args.out_dir / f"{stem}.txt").read_text())
    what = (
        f"{args.streams} asks one after another (one-token answers)"
        if args.phase == "ask"
        else f"{args.streams} {args.phase} streams"
    )
    ttft = window.get("ttft_p50")
    return "\n".join(
        [
            f"# Gateway profile: {what}",
            "",
            f"Reproduce: `python -m bench.profile_gateway --phase {args.phase}"
            f" --streams {args.streams}`."
            f" Gateway: {bench.meta.get('gateway_source')}.",
            "",
            f"- window: {record.wall:.1f} s, {chunks} tokens relayed, {window.get('errors')} "
            f"errors; gateway CPU {cpu:.2f} s = {cpu / max(chunks, 1) * 1e6:.0f} µs per token "
            f"({cpu / max(chunks, 1) * 1000:.3f} CPU-s per 1,000 tokens), "
            f"{cpu / max(record.wall, 1e-9):.0%} of its core; other load "
            f"{record.foreign_load:.2f} cores; TTFT p50 "
            + (f"{ttft * 1000:.1f} ms" if isinstance(ttft, float) else "?"),
            f"- event loop in the gateway process: "
            f"{'uvloop' if loops.get('uvloop/loop.cpython') else 'asyncio'}"
            f"{', HTTP parser httptools' if loops.get('httptools/parser') else ''}",
            f"- flame graph: [{stem}.svg]({stem}.svg); collapsed stacks: {stem}.txt",
            "",
            hotspots(stacks),
            "",
        ]
    )


async def _toggled_window(bench: Bench, record: WindowRecord, written: Path) -> None:
    """Run the window between two SIGUSR1s to the gateway, whose start-up hook (callcount/,
    stallwatch/) switches itself on at the first and writes `written` at the second."""
    assert bench.gateway is not None
    pid = bench.gateway.service.pid
    os.kill(pid, signal.SIGUSR1)  # on
    await asyncio.sleep(0.2)
    await bench.run_window(record)
    os.kill(pid, signal.SIGUSR1)  # off, and the file written
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while loop.time() < deadline:
        if await asyncio.to_thread(written.exists):
            await asyncio.sleep(0.5)  # written whole
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway wrote nothing to {written}")


def _calls_report(
    args: argparse.Namespace, bench: Bench, record: WindowRecord, stats_path: Path
) -> str:
    stats: dict[tuple[str, int, str], tuple[int, int, float, float, object]]
    stats = pstats.Stats(str(stats_path)).stats  # type: ignore[attr-defined]
    chunks = max(int(record.loadgen.get("chunks", 0) or 0), 1)
    total = sum(v[1] for v in stats.values())
    python = sum(v[1] for k, v in stats.items() if k[0] != "~")
    what = "ask" if args.phase == "ask" else "relayed token"

    def where(key: tuple[str, int, str]) -> str:
        path, line, name = key
        if path == "~":
            return f"`{name}` (C)"
        short = path.split("site-packages/")[-1].split("/src/")[-1].split("/lib/python3")[-1]
        return f"`{name}` ({short}:{line})"

    rows = sorted(stats.items(), key=lambda kv: -kv[1][1])[:30]
    lines = [
        f"# Gateway call counts: {args.streams} {args.phase} streams",
        "",
        f"Reproduce: `python -m bench.profile_gateway --count-calls --phase {args.phase}"
        f" --streams {args.streams}`. Gateway: {bench.meta.get('gateway_source')}.",
        "",
        f"cProfile in the gateway for the window only: {chunks} {what}s"
        f"{' (one-token answers)' if args.phase == 'ask' else ''}, **{total / chunks:.1f} calls"
        f" per {what}**, {python / chunks:.1f} of them to Python functions (the rest to"
        " builtins and C methods)."
        + (" The asks that start the streams are included." if args.phase != "ask" else ""),
        "",
        f"| calls per {what} | function |",
        "|---:|---|",
        *(f"| {v[1] / chunks:.2f} | {where(k)} |" for k, v in rows),
        "",
    ]
    return "\n".join(lines)


def _ms(values: list[float], q: float, *, digits: int = 1) -> str:
    """The q-th percentile of `values` (seconds) in milliseconds, "-" when there are none."""
    value = percentile(values, q)
    return "-" if value is None else f"{value * 1000:.{digits}f}"


def _stalls_report(
    args: argparse.Namespace, bench: Bench, record: WindowRecord, stalls_path: Path
) -> str:
    data = json.loads(stalls_path.read_text())
    lateness = data["lateness"]
    stalls = data["stalls"]
    seen = [s["seen"] for s in stalls]  # set with each stall's first sample
    stacks: Counter[str] = Counter(sample for s in stalls for sample in s["samples"])
    collapsed = [(stack.split(";"), n) for stack, n in stacks.items()]
    stem = _stem(args.phase)
    (args.out_dir / f"{stem}-stalls.txt").write_text(
        "".join(f"{stack} {n}\n" for stack, n in stacks.most_common())
    )
    window = record.loadgen

    threshold = data["threshold"] * 1000
    collections = data.get("collections", [])
    generations = sorted({gen for _, _, gen in collections})
    by_generation = {g: sorted(d for _, d, gen in collections if gen == g) for g in generations}
    # The collector's time inside stalls: its runs that began between a stall's last tick
    # and its last sample.
    collecting = sum(
        seconds
        for start, seconds, _ in collections
        for s in stalls
        if s["start"] <= start <= s["start"] + s["seen"]
    )

    def runs(g: int, d: list[float]) -> str:
        return f"gen {g}: {len(d)}, total {sum(d) * 1000:.1f} ms, longest {d[-1] * 1000:.1f} ms"

    return "\n".join(
        [
            f"# Gateway event-loop stalls: {args.streams} {args.phase} streams",
            "",
            f"Reproduce: `python -m bench.profile_gateway --stalls --phase {args.phase}"
            f" --streams {args.streams}`. Gateway: {bench.meta.get('gateway_source')}.",
            "",
            f"A callback re-armed every {data['tick'] * 1000:.0f} ms stamps when the loop ran"
            " it; its lateness is how long anything ready (a token to relay, a request) waited"
            f" for the loop. While the stamp was older than {threshold:.0f} ms a thread"
            " sampled the main thread's stack (`bench/stallwatch/`; ~1 ms apart, so a stall"
            " shows about one sample per millisecond it lasted).",
            "",
            f"- window: {record.wall:.1f} s, {window.get('chunks')} tokens relayed, "
            f"{window.get('errors')} errors",
            f"- tick lateness over {len(lateness)} ticks: p50 {_ms(lateness, 50)} ms, p90 "
            f"{_ms(lateness, 90)}, p99 {_ms(lateness, 99)}, p99.9 {_ms(lateness, 99.9)}, max "
            f"{_ms(lateness, 100)} ms",
            f"- stalls over {threshold:.0f} ms: {len(stalls)}; sampled length p50 "
            f"{_ms(seen, 50)} ms, max {_ms(seen, 100)} ms (a lower bound: from the last tick to"
            " the last sample)",
            f"- the garbage collector ran {collecting * 1000:.1f} ms of the"
            f" {sum(seen) * 1000:.1f} ms sampled as stalled",
            "- collector runs in the window, by generation: "
            + ("; ".join(runs(g, d) for g, d in by_generation.items()) or "none"),
            f"- collapsed stacks of the samples: {stem}-stalls.txt",
            "",
            hotspots(collapsed, samples="samples taken while the loop was stalled")
            if collapsed
            else "No stall: nothing to sample.",
            "",
        ]
    )


# (label, from stamp, to stamp) of bench/timeline/'s records, in the order an ask meets them.
TIMELINE_SEGMENTS: Final = (
    ("uvicorn: request read, to the app", "received", "middleware"),
    ("Litestar and the handler: routing, auth, body, limits", "middleware", "turn"),
    ("turn manager: the early call's request built", "turn", "transport"),
    ("transport: a connection (idle, or connected) and the write", "transport", "llm_request"),
    ("first token in from the LLM to its delta out to the client", "llm_token", "delta_out"),
)


def _timeline_report(
    args: argparse.Namespace,
    bench: Bench,
    record: WindowRecord,
    floor: WindowRecord,
    path: Path,
) -> str:
    asks: list[dict[str, float]] = json.loads(path.read_text())

    def row(label: str, values: list[float]) -> str:
        cells = " | ".join(_ms(values, q, digits=2) for q in (50, 90, 99))
        return f"| {label} | {cells} |"

    spans = {
        label: [a[end] - a[start] for a in asks if start in a and end in a]
        for label, start, end in TIMELINE_SEGMENTS
    }
    # The hook writes only asks that reached their first delta, with all four of these.
    total = [a["llm_request"] - a["received"] + a["delta_out"] - a["llm_token"] for a in asks]
    gateway, upstream = record.loadgen, floor.loadgen

    def ttft(window: dict[str, Any], key: str) -> float:
        value = window.get(key)
        return float(value) if isinstance(value, (int, float)) else float("nan")

    added = [(ttft(gateway, key) - ttft(upstream, key)) * 1000 for key in ("ttft_p50", "ttft_p99")]
    hops = _timeline_hops(asks, bench.streams, record.id, floor.id)
    return "\n".join(
        [
            f"# Gateway timeline: {args.streams} {args.phase} streams",
            "",
            f"Reproduce: `python -m bench.profile_gateway --timeline --phase {args.phase}"
            f" --streams {args.streams}`. Gateway: {bench.meta.get('gateway_source')}.",
            "",
            "Each ask is stamped on its way through the gateway (`bench/timeline/`), from the"
            " moment uvicorn read it to the moment its first delta went out. The benchmark's"
            " added time to first token, measured from the load generator, also holds the hops"
            " outside the gateway: the client's to it, and the gateway's round trip to the fake"
            " upstream (which shares core 1 with the load generator); the second table has them.",
            "",
            f"- {len(asks)} asks stamped of {args.streams}; window {record.wall:.1f} s,"
            f" {gateway.get('errors')} errors",
            f"- added TTFT in this pair of windows (gateway vs the bare upstream, p50 / p99):"
            f" {added[0]:+.2f} / {added[1]:+.2f} ms",
            "",
            "| segment | p50 ms | p90 ms | p99 ms |",
            "|---|---:|---:|---:|",
            *(row(label, spans[label]) for label, _, _ in TIMELINE_SEGMENTS),
            row("**in the gateway, all told**", total),
            "",
            "Outside the gateway, per ask (the load generator's and the gateway's clocks are the"
            " machine's one monotonic clock; joined by the client's port): the wait for the"
            " gateway's own event loop to read a socket is in these rows, not in the ones above.",
            "",
            "| hop | p50 ms | p90 ms | p99 ms |",
            "|---|---:|---:|---:|",
            *(row(label, values) for label, values in hops),
            "",
        ]
    )


def _timeline_hops(
    asks: list[dict[str, float]],
    streams: list[dict[str, Any]],
    window: int,
    floor_window: int,
) -> list[tuple[str, list[float]]]:
    """The time each ask spent outside the gateway, against the bare upstream's own hops."""
    by_port = {
        int(s["port"]): s
        for s in streams
        if s.get("window") == window and s.get("port") and s.get("ttft") is not None
    }
    client_in: list[float] = []
    client_out: list[float] = []
    upstream_side: list[float] = []
    for ask in asks:
        stream = by_port.get(int(ask["port"]))
        if stream is None:
            continue
        client_in.append(ask["received"] - stream["begun"])
        client_out.append(stream["begun"] + stream["ttft"] - ask["delta_out"])
        if stream.get("sched_ttft") is not None:
            upstream_side.append(ask["llm_token"] - ask["llm_request"] - stream["sched_ttft"])
    floor = [
        s["ttft"] - s["sched_ttft"]
        for s in streams
        if s.get("window") == floor_window
        and s.get("ttft") is not None
        and s.get("sched_ttft") is not None
    ]
    return [
        ("client to gateway: connect, the request written, read by the gateway", client_in),
        (
            "gateway to fake upstream and back, less the upstream's scheduled first token",
            upstream_side,
        ),
        ("gateway to client: the first delta written, read by the load generator", client_out),
        ("the bare upstream's own window: its TTFT less its scheduled first token", floor),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_gateway", description=__doc__)
    parser.add_argument(
        "--phase",
        choices=("paced", "zero", "ask"),
        default="paced",
        help="ask: --streams questions one after another, one-token answers (the TTFT path)",
    )
    parser.add_argument("--streams", type=int, default=30)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument(
        "--count-calls",
        action="store_true",
        help="count calls per token with cProfile instead of sampling (profile-calls.md)",
    )
    parser.add_argument(
        "--stalls",
        action="store_true",
        help="watch the event loop instead: how late it ran ready callbacks, and stacks sampled"
        " while it was stalled (profile-stalls.md)",
    )
    parser.add_argument("--stall-ms", type=float, default=5.0, help="what --stalls calls a stall")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="stamp each ask's way through the gateway instead (bench/timeline/): where the"
        " gateway's share of the added time to first token goes (profile-timeline.md)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument(
        "passthrough", nargs="*", help="further bench.run options (after --), e.g. --gateway-ref"
    )
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qna-profile-"))
    text = asyncio.run(_profile(args, work))
    suffix = (
        "-calls"
        if args.count_calls
        else "-timeline"
        if args.timeline
        else "-stalls"
        if args.stalls
        else ""
    )
    (args.out_dir / f"{_stem(args.phase)}{suffix}.md").write_text(text)
    print(text)
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
