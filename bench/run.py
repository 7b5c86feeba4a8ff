"""`python -m bench.run [--quick]`: the fake upstream, qna-gateway, LiteLLM and a hand-rolled
FastAPI relay, side by side.

One run starts every system, then sweeps concurrency levels with every configuration
interleaved (a round is one window of each configuration at each level; rounds repeat, and
the order of configurations rotates from round to round):

  upstream  the fake upstream directly: the floor every figure is measured against
  gateway   qna-gateway with persistence on (PostgreSQL), tools mode
  litellm   LiteLLM proxy (pinned release), one worker, pointed at the same upstream
  relay     FastAPI + the openai SDK relaying the stream (bench/peers/), one worker, likewise

The gateway and its peers run on core 0; the fake upstream and the load generator on core 1.
Raw results go to bench/results/latest-raw.jsonl.gz, then `bench.report` writes latest.md,
latest.json and the plots.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import cells, environment, report
from bench.dbcount import DbAccounting
from bench.options import Options, options_from_args
from bench.procs import (
    PeakSampler,
    Usage,
    cores,
    cpu_delta,
    machine_busy_seconds,
    mapped_libraries,
    pinned,
    usage_of,
)
from bench.stack import (
    ROOT,
    BenchDatabase,
    EmbeddedServer,
    Gateway,
    Proxy,
    Upstream,
    litellm_venv,
    start_gateway,
    start_litellm,
    start_relay,
    start_upstream,
)

# Other processes may use this much of the machine (in cores) before a window starts.
QUIET_CORES: Final = 0.15
# A process under test using more than this is still busy with the previous window.
BUSY_CORES: Final = 0.1
SYSTEMS: Final = ("gateway", "litellm", "relay")
ZERO_SINGLE_STREAMS: Final = 20
# One paced stream is one sample of time to first token per round, so two samples made the
# 1-stream p50/p99 of a run: one late first token (+5.8 ms once, in the round that followed the
# 500-stream windows) decided the target's verdict. Four in a row make it 8 samples, ~3 min.
PACED_SINGLE_STREAMS: Final = 4
# Zero-delay streams through every configuration before anything is measured: enough for the
# connection pools to hold what a 50-stream window needs. After 5, the first 50-stream window
# of a run gave the gateway's streams 1.4-2.4 ms more time to first token (paired p50) than the
# later rounds did, in each of four runs; after 60, +1.8 ms against +2.1 and +1.7 (one run).
WARM_UP_STREAMS: Final = 50
# A paced stream's length (0.3 s to the first of 300 tokens at 40 a second): with --open-loop,
# arrivals at N / this a second, for this long, hold about N streams open at the end.
OPEN_LOOP_SECONDS: Final = 7.8
# A held window: arrivals at N / OPEN_LOOP_SECONDS a second for three stream lengths; the
# streams of the middle one are measured, and N streams are open (on average, Little's law)
# from their first chunk to their last. The first third fills up to N, the last keeps it.
HELD_THIRDS: Final = 3


@dataclass
class WindowRecord:
    id: int
    phase: str
    round: int
    level: int
    config: str
    status: str = "ran"  # or "skipped: <why>"
    refine: bool = False  # a bisection probe after the sweep (no database accounting)
    streams_per_worker: int = 1
    fake: dict[str, object] = field(default_factory=dict)  # directive fields for every request
    expected_chunks: int = 300
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)
    upstream: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    db: dict[str, float] = field(default_factory=dict)
    quiesce_seconds: float = 0.0
    quiet_wait: float = 0.0
    foreign_load: float = 0.0  # cores busy with processes not of this benchmark, on average
    loadgen: dict[str, Any] = field(default_factory=dict)


class Bench:
    """One run: the stack, the sweep and the records it produces."""

    def __init__(self, options: Options, work: Path) -> None:
        self.options = options
        self.work = work
        spare = cores()
        self.pin_server = spare[0] if len(spare) >= 2 else None
        self.pin_load = spare[1] if len(spare) >= 2 else None
        self.upstream: Upstream | None = None
        self.gateway: Gateway | None = None
        self.peers: dict[str, Proxy] = {}  # by configuration: litellm, relay
        self.db: BenchDatabase | None = None
        self.embedded: EmbeddedServer | None = None
        self.windows: list[WindowRecord] = []
        self.streams: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {}
        self.chats: list[str] = []
        self.dbcount: DbAccounting | None = None
        self._quiet_budget = options.quiet_budget

    # -- the stack ----------------------------------------------------------------------------

    async def start(self) -> None:
        options = self.options
        self.upstream = await start_upstream(self.work, self.pin_load)
        source, kb = self._gateway_source()
        if options.db == "embedded":
            self.embedded = EmbeddedServer(self.work / "postgres")
            admin_url = await self.embedded.start()
        else:
            admin_url = options.admin_url
        self.db = BenchDatabase(admin_url, f"qna_bench_{os.getpid()}", embedded=self.embedded)
        await self.db.create()
        self.dbcount = DbAccounting(self.db)
        gateway = asyncio.create_task(
            start_gateway(
                source=source,
                kb_dir=kb,
                database_url=self.db.url,
                upstream=self.upstream,
                port=_free_port(),
                pool_max=options.pool_max,
                extra_env=options.gateway_env,
                work_dir=self.work,
                core=self.pin_server,
            )
        )
        peers: dict[str, asyncio.Task[Proxy]] = {}
        if "litellm" in options.configs:
            peers["litellm"] = asyncio.create_task(
                start_litellm(
                    venv=litellm_venv(),
                    upstream=self.upstream,
                    port=_free_port(),
                    work_dir=self.work,
                    core=self.pin_server,
                )
            )
        if "relay" in options.configs:
            peers["relay"] = asyncio.create_task(
                start_relay(
                    upstream=self.upstream,
                    port=_free_port(),
                    work_dir=self.work,
                    core=self.pin_server,
                )
            )
        await asyncio.gather(gateway, *peers.values())
        self.gateway = gateway.result()
        self.peers = {name: task.result() for name, task in peers.items()}

    def _gateway_source(self) -> tuple[Path, Path]:
        """src/ and kb/ to run: the working tree, or a snapshot of a git ref (stable while
        others edit the tree)."""
        ref = self.options.gateway_ref
        if ref is None:
            return ROOT / "src", ROOT / "kb"
        snapshot = self.work / "gateway-src"
        snapshot.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", ref, "src", "kb"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive, check=True)
        return snapshot / "src", snapshot / "kb"

    async def stop(self) -> None:
        for name, service in (
            *((name, peer.service) for name, peer in self.peers.items()),
            ("gateway", self.gateway.service if self.gateway else None),
            ("upstream", self.upstream.service if self.upstream else None),
        ):
            if service is not None:
                code = await service.stop()
                self.meta.setdefault("exit_codes", {})[name] = code
        if self.db is not None:
            await self.db.drop()
        if self.embedded is not None:
            await self.embedded.stop()

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.upstream:
            out["upstream"] = self.upstream.service.pid
        if self.gateway:
            out["gateway"] = self.gateway.service.pid
        out.update((name, peer.service.pid) for name, peer in self.peers.items())
        return out

    # -- measuring ----------------------------------------------------------------------------

    async def _usage(self) -> Usage:
        pids = self.pids()
        if self.db is not None:
            for pid in await self.db.backend_pids():
                pids[f"pg:{pid}"] = pid
        return usage_of(pids)

    async def calibrate(self) -> None:
        """Idle CPU of every process, and the start of the first idle database interval."""
        seconds = self.options.calibrate_seconds
        if self.dbcount is not None:
            await self.dbcount.start_idle()
        usage0 = await self._usage()
        await asyncio.sleep(seconds)
        usage1 = await self._usage()
        idle = cpu_delta(usage0, usage1)
        self.meta["idle"] = {
            "seconds": seconds,
            "cpu_share": {k: v / seconds for k, v in idle.items() if not k.startswith("pg:")},
            "rss": {k: v for k, v in usage1.rss.items() if not k.startswith("pg:")},
        }

    async def _ours(self) -> float:
        usage = await self._usage()
        return sum(usage.cpu.values()) + time.process_time()

    async def wait_quiet(self) -> float:
        """Wait (up to --quiet-wait, and --quiet-budget over the run) until other processes
        leave the cores alone: a test suite running on the same machine would otherwise be
        measured as our overhead. Each window records the load it got anyway."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        limit = min(self.options.quiet_wait, self._quiet_budget)
        while True:
            busy0, ours0 = machine_busy_seconds(), await self._ours()
            await asyncio.sleep(0.5)
            busy1, ours1 = machine_busy_seconds(), await self._ours()
            foreign = ((busy1 - busy0) - (ours1 - ours0)) / 0.5
            waited = loop.time() - start
            if foreign < QUIET_CORES or waited >= limit:
                self._quiet_budget = max(0.0, self._quiet_budget - max(0.0, waited - 0.5))
                if foreign >= QUIET_CORES and limit > 0:
                    print(
                        f"  (machine still busy: {foreign:.2f} cores used by other "
                        f"processes after {waited:.0f}s; measuring anyway)",
                        flush=True,
                    )
                return waited

    async def quiesce(self, within: float = 20.0) -> float:
        """Wait until the upstream serves nothing, the gateway has no open stream (a cut
        stream's turn runs on for QNA_ORPHAN_SECONDS) and no process under test is still
        working off the last window: requests a saturated proxy has queued keep its core
        busy after the load generator gave up on them, and the gateway shares that core."""
        assert self.upstream is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < within:
            busy = (await self.upstream.stats())["active"] > 0
            if not busy and self.gateway is not None:
                metrics = await self.gateway.metrics()
                busy = metrics.get("sse_open_streams", 0) > 0
            if not busy:
                before = await self._usage()
                await asyncio.sleep(0.5)  # /proc counts CPU in 10 ms ticks
                working = cpu_delta(before, await self._usage())
                busy = any(working.get(name, 0.0) / 0.5 > BUSY_CORES for name in SYSTEMS)
            if not busy:
                return loop.time() - start
            await asyncio.sleep(0.25)
        return loop.time() - start

    # -- one window ---------------------------------------------------------------------------

    def _loadgen_argv(self, record: WindowRecord, out: Path) -> list[str]:
        options = self.options
        paced = record.phase == "paced"
        level = record.level
        held = record.phase == "held"
        open_loop = options.open_loop and paced and level > 1
        deadline = options.paced_deadline if paced or held else options.zero_deadline
        if open_loop:
            deadline += OPEN_LOOP_SECONDS  # the last stream starts that much later
        if paced and not open_loop:
            deadline += (record.streams_per_worker - 1) * OPEN_LOOP_SECONDS  # in a row
        if held:
            deadline += HELD_THIRDS * OPEN_LOOP_SECONDS
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--control",
            "--out",
            str(out),
            "--label",
            f"{record.phase}/{record.config}/{level}/r{record.round}",
            "--seed-base",
            str(_seed_base(record)),
            "--deadline",
            str(deadline),
            "--schedule",
            "paced" if paced or held else "none",
        ]
        argv += [
            "--streams-per-worker",
            str(record.streams_per_worker),
            "--expected-chunks",
            str(record.expected_chunks),
        ]
        if record.fake:
            argv += ["--fake", json.dumps(record.fake)]
        if open_loop or held:
            # Little's law: arrivals at N / (stream length) hold N streams open on average.
            thirds = HELD_THIRDS if held else 1
            argv += [
                "--rate",
                f"{level / OPEN_LOOP_SECONDS:.3f}",
                "--duration",
                str(thirds * OPEN_LOOP_SECONDS),
            ]
            if held:
                argv += ["--measure", f"{level}:{2 * level}"]
        else:
            argv += ["-c", str(level), "--ramp", "1.0" if paced and level > 1 else "0"]
        if record.config == "upstream":
            assert self.upstream is not None
            argv += ["--target", "openai", "--url", self.upstream.base_url + "/chat/completions"]
        elif (peer := self.peers.get(record.config)) is not None:
            argv += ["--target", "openai", "--url", peer.completions_url]
            for header in peer.headers:
                argv += ["--header", header]
        else:
            assert self.gateway is not None
            # Open loop: level / OPEN_LOOP_SECONDS a second for OPEN_LOOP_SECONDS, as many.
            streams = _streams(record)
            chats_file = out.with_suffix(".chats")
            chats, self.chats = self.chats[:streams], self.chats[streams:]
            if len(chats) < streams:
                raise RuntimeError("ran out of pre-created chats")
            chats_file.write_text("\n".join(chats) + "\n")
            argv += [
                "--target",
                "gateway",
                "--url",
                self.gateway.url,
                "--chats-file",
                str(chats_file),
            ]
        return pinned(argv, self.pin_load)

    async def ensure_chats(self, needed: int) -> None:
        """Chats beyond those made up front (high levels are often never reached)."""
        if len(self.chats) >= needed:
            return
        assert self.gateway is not None
        if self.dbcount is not None:
            await self.dbcount.forget_idle()  # these commits are not background
        self.chats += await self.gateway.create_chats(needed - len(self.chats))
        if self.dbcount is not None:
            self.dbcount.activity()

    async def run_window(self, record: WindowRecord) -> None:
        out = self.work / f"window-{record.id}.jsonl"
        if record.config == "gateway":
            await self.ensure_chats(_streams(record))
        argv = self._loadgen_argv(record, out)
        dbcount = self.dbcount if record.config == "gateway" else None
        opened = None
        if dbcount is not None and record.phase == "paced" and not record.refine:
            opened = await dbcount.open()
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdin is not None
        assert process.stdout is not None
        ready = await asyncio.wait_for(process.stdout.readline(), 60)
        if ready.strip() != b"READY":
            raise RuntimeError(f"load generator did not start: {ready!r}")
        assert self.upstream is not None
        upstream0 = await self.upstream.stats()
        metrics0 = (
            await self.gateway.metrics() if record.config == "gateway" and self.gateway else {}
        )
        usage0 = await self._usage()
        busy0, self_cpu0 = machine_busy_seconds(), time.process_time()
        sampler = PeakSampler({record.config: self.pids()[record.config]})
        sampler.start()
        started = time.monotonic()
        process.stdin.write(b"GO\n")
        await process.stdin.drain()
        output = await process.stdout.read()
        record.wall = time.monotonic() - started
        await process.wait()
        usage1 = await self._usage()
        busy1, self_cpu1 = machine_busy_seconds(), time.process_time()
        record.rss_peak = await sampler.stop()
        record.rss_before = {k: v for k, v in usage0.rss.items() if not k.startswith("pg:")}
        cpu = cpu_delta(usage0, usage1)
        record.cpu = {k: v for k, v in cpu.items() if not k.startswith("pg:")}
        record.cpu["postgres"] = sum(v for k, v in cpu.items() if k.startswith("pg:"))
        upstream1 = await self.upstream.stats()
        record.upstream = {
            k: int(upstream1[k]) - int(upstream0[k])
            for k in ("requests", "streams", "completed", "chunks", "disconnects")
        }
        lines = output.decode().strip().splitlines()
        record.loadgen = json.loads(lines[-1]) if lines else {}
        ours = sum(cpu.values()) + (self_cpu1 - self_cpu0)
        ours += float(record.loadgen.get("loadgen_cpu", 0.0))
        record.foreign_load = max(0.0, (busy1 - busy0) - ours) / max(record.wall, 1e-9)
        if out.exists():
            for line in out.read_text().splitlines():
                item = json.loads(line)
                if item.get("kind") == "stream":
                    item["window"] = record.id
                    self.streams.append(item)
        record.quiesce_seconds = await self.quiesce()
        if record.config == "gateway" and self.gateway is not None:
            # After quiescing: streams cut at the deadline end their turns (and writes) late.
            metrics1 = await self.gateway.metrics()
            record.metrics = {
                k: metrics1[k] - metrics0.get(k, 0.0)
                for k in metrics1
                if k.startswith(
                    (
                        "db_statements_total",
                        "llm_early_starts_total",
                        "llm_tokens_relayed_total",
                        "turns_total",
                    )
                )
            }
        if dbcount is not None:
            dbcount.activity()
            if opened is not None:
                dbcount.close_later(opened, record.db)

    # -- the sweep ----------------------------------------------------------------------------

    async def warm_up(self) -> None:
        """Streams through every configuration, so imports and pools are warm."""
        assert self.upstream is not None
        await self.upstream.use_zero()
        for config in self.options.configs:
            record = WindowRecord(
                id=-1, phase="warmup", round=0, level=WARM_UP_STREAMS, config=config
            )
            await self.run_window(record)
        self.streams.clear()
        usage = await self._usage()
        self.meta["baseline_rss"] = {k: v for k, v in usage.rss.items() if not k.startswith("pg:")}

    async def sweep(self) -> None:
        options = self.options
        assert self.upstream is not None
        next_id = 0
        # Paced first: its windows see the gateway's memory before any zero-delay burst grew it.
        # Held windows go on from where the paced ones saturated a system, before the paced
        # levels above them: after 1,000-stream windows the harness itself once lagged in the
        # next (held) window, and the gateway's heap had grown for twice the streams.
        saturated: dict[str, int] = {}
        top = max(options.held_levels, default=None)
        below = tuple(n for n in options.paced_levels if top is None or n <= top)
        phases = (
            ("paced", below),
            ("held", options.held_levels),
            ("paced", tuple(n for n in options.paced_levels if n not in below)),
            ("zero", options.zero_levels),
        )
        calibrated = False
        for phase, levels in phases:
            if not levels:
                continue
            if phase == "zero":
                await self.upstream.use_zero()
                saturated = {}
            elif not calibrated:
                await self.upstream.use_paced()
                await self.calibrate()
                calibrated = True
            for round_ in range(options.rounds):
                order = _rotated(options.configs, round_)
                for level in levels:
                    for config in order:
                        record = WindowRecord(next_id, phase, round_, level, config)
                        if level == 1:
                            record.streams_per_worker = _single_streams(phase, options)
                        next_id += 1
                        limit = saturated.get(config)
                        # Held levels hold as many streams as the paced level of that number,
                        # and for longer: one the paced phase saturated at is skipped too.
                        if limit is not None and (
                            level > limit or (phase == "held" and level >= limit)
                        ):
                            record.status = f"skipped: saturated at {limit} streams"
                            self.windows.append(record)
                            continue
                        record.quiet_wait = await self.wait_quiet()
                        await self.run_window(record)
                        self.windows.append(record)
                        _print_window(record)
                        if _saturated(record):
                            saturated[config] = min(level, saturated.get(config, level))
            if self.dbcount is not None:
                await self.dbcount.wait_closed()

    async def refine(self) -> None:
        """Bisect between each system's highest paced level within the limits and the first
        level above it that is not, so the capacity figure is not just a sweep level."""
        if self.options.refine <= 0 or not self.options.paced_levels:
            return
        assert self.upstream is not None
        assert self.gateway is not None
        if self.dbcount is not None:
            await self.dbcount.forget_idle()  # refining windows are not accounted
        await self.upstream.use_paced()
        next_id = len(self.windows)
        for config in (c for c in self.options.configs if c != "upstream"):
            for _ in range(self.options.refine):
                pooled = cells.build_cells(
                    cells.Run(self.meta, [asdict(w) for w in self.windows], self.streams)
                )
                passing = cells.highest_within_limits(pooled, config)
                above = sorted(
                    level
                    for phase, c, level in pooled
                    if phase == "paced" and c == config and level > passing
                )
                if not above or above[0] <= passing + 1:
                    break
                level = round(math.sqrt(max(passing, 1) * above[0]))
                level = min(max(level, passing + 1), above[0] - 1)
                print(
                    f"  refining {config}: between {passing} and {above[0]} streams, "
                    f"trying {level}",
                    flush=True,
                )
                for target in ("upstream", config):
                    if ("paced", target, level) in pooled and target == "upstream":
                        continue
                    record = WindowRecord(
                        next_id, "paced", self.options.rounds, level, target, refine=True
                    )
                    next_id += 1
                    record.quiet_wait = await self.wait_quiet()
                    await self.run_window(record)
                    self.windows.append(record)
                    _print_window(record)

    async def prepare_chats(self) -> None:
        """Chats for the windows up to 200 streams, before anything is measured."""
        assert self.gateway is not None
        options = self.options
        levels = [
            _single_streams(phase, options) if n == 1 else n
            for phase, phase_levels in (
                ("paced", options.paced_levels),
                ("zero", options.zero_levels),
            )
            for n in phase_levels
            if n <= 200
        ]
        started = time.monotonic()
        self.chats = await self.gateway.create_chats(sum(levels) * options.rounds + 10)
        if self.dbcount is not None:
            self.dbcount.activity()
        print(f"created {len(self.chats)} chats in {time.monotonic() - started:.1f}s", flush=True)

    async def describe(self) -> None:
        assert self.db is not None
        assert self.gateway is not None
        meta = self.meta
        meta["machine"] = environment.machine()
        meta["packages"] = environment.packages()
        litellm, relay = self.peers.get("litellm"), self.peers.get("relay")
        meta["litellm"] = litellm.versions["litellm"] if litellm else None
        meta["relay"] = relay.versions if relay else None
        meta["postgres"] = await self.db.server_version()
        meta["db_statements_source"] = self.db.statements_source
        meta["gateway_source"] = environment.gateway_source(self.options.gateway_ref)
        libraries = ("uvloop/loop.cpython", "httptools/parser")
        meta["event_loops"] = {
            name: mapped_libraries(pid, libraries) for name, pid in self.pids().items()
        }
        meta["pinning"] = {"servers": self.pin_server, "upstream_and_load": self.pin_load}
        meta["options"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items()
        }
        meta["warm_up_streams"] = WARM_UP_STREAMS
        meta["paced_single_streams"] = _single_streams("paced", self.options)

    def write_raw(self, path: Path) -> None:
        if self.dbcount is not None:
            self.meta["db_idle"] = self.dbcount.idle
        with gzip.open(path, "wt") as out:
            out.write(json.dumps({"kind": "meta", **self.meta}) + "\n")
            for record in self.windows:
                out.write(json.dumps({"kind": "window", **asdict(record)}) + "\n")
            for stream in self.streams:
                out.write(json.dumps(stream) + "\n")


def _single_streams(phase: str, options: Options) -> int:
    """Streams one after another in a 1-stream window (one is too few samples). A held
    window's streams arrive at a rate, not one after another: it keeps 1."""
    if phase == "zero":
        return ZERO_SINGLE_STREAMS  # one zero-delay stream is over in ~0.2 s
    if phase == "paced" and not options.quick:
        return PACED_SINGLE_STREAMS
    return 1


def _seed_base(record: WindowRecord) -> int:
    # The same seeds for every configuration of a (phase, round, level): paired streams.
    phase = {"paced": 1_000_000, "held": 2_000_000}.get(record.phase, 0)
    return phase + record.round * 100_000 + record.level


def _streams(record: WindowRecord) -> int:
    thirds = HELD_THIRDS if record.phase == "held" else 1
    return record.level * record.streams_per_worker * thirds


def _rotated(configs: Sequence[str], by: int) -> list[str]:
    k = by % len(configs)
    return [*configs[k:], *configs[:k]]


def _saturated(record: WindowRecord) -> bool:
    """Stop going higher once a configuration drops a tenth of its streams or misses the
    deadline: every level above would only spend the deadline again."""
    window = record.loadgen
    streams = int(window.get("streams", 0) or 0)
    errors = int(window.get("errors", 0) or 0)
    return streams > 0 and errors / streams > 0.1


def _print_window(record: WindowRecord) -> None:
    window = record.loadgen
    ttft = window.get("ttft_p50")
    print(
        f"  {record.phase:5} r{record.round} {record.config:8} N={record.level:<5}"
        f" wall {record.wall:6.1f}s  chunks {window.get('chunks', 0):>7}"
        f"  errors {window.get('errors', 0):>4}  ttft p50 "
        + (f"{ttft * 1000:7.1f} ms" if isinstance(ttft, float) else "      -")
        + f"  cpu {record.cpu.get(record.config, 0.0):5.1f}s"
        + (f"  other load {record.foreign_load:.2f} cores" if record.foreign_load > 0.1 else ""),
        flush=True,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _run(options: Options, work: Path) -> Path:
    bench = Bench(options, work)
    began = time.monotonic()
    try:
        print(
            "starting fake upstream, database, gateway"
            + (", LiteLLM" if "litellm" in options.configs else "")
            + (", the FastAPI relay" if "relay" in options.configs else "")
            + "...",
            flush=True,
        )
        await bench.start()
        await bench.describe()
        print(f"started in {time.monotonic() - began:.0f}s; warming up", flush=True)
        await bench.prepare_chats()
        await bench.warm_up()
        await bench.sweep()
        await bench.refine()
    finally:
        bench.meta["seconds"] = time.monotonic() - began
        await bench.stop()
    options.out_dir.mkdir(parents=True, exist_ok=True)
    raw = options.out_dir / "latest-raw.jsonl.gz"
    bench.write_raw(raw)
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    options = options_from_args(argv)
    if len(cores()) < 2:
        print("note: fewer than 2 cores: nothing is pinned, figures are not comparable")
    work = Path(tempfile.mkdtemp(prefix="qna-bench-"))
    try:
        raw = asyncio.run(_run(options, work))
    except BaseException:
        print(f"benchmark failed; logs are in {work}", file=sys.stderr)
        raise
    summary = report.write_all(raw, options.out_dir)
    print(summary)
    if options.keep_work:
        print(f"work folder kept: {work}")
    else:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
