"""A run's raw results pooled per (phase, system, level), with every figure against the floor."""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.stats import Histogram, percentile

PEERS: Final = ("gateway", "litellm", "relay")
LABELS: Final = {
    "upstream": "(a) fake upstream direct",
    "gateway": "(b) qna-gateway",
    "litellm": "(c) LiteLLM proxy",
    "relay": "(d) hand-rolled FastAPI relay",
}
# Phases whose upstream is paced: `paced` (N streams started over 1 s) and `held` (arrivals at
# N per stream length, measured while N are open).
PACED_PHASES: Final = ("paced", "held")
LIMIT_TTFT_P99: Final = 0.050
LIMIT_GAP_P99: Final = 0.010
# The upstream keeps up when its chunks arrive this close to their schedule and the core it
# shares with the load generator is not saturated.
UPSTREAM_LATENESS_OK: Final = 0.010
CORE_SHARE_OK: Final = 0.85


@dataclass
class Cell:
    """One configuration at one level of one phase, all rounds pooled."""

    phase: str
    config: str
    level: int
    windows: int = 0
    skipped: str = ""
    streams: int = 0
    errors: int = 0
    mismatched: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    gap_p50: float | None = None
    gap_p99: float | None = None
    late_p99: float | None = None
    added_ttft_p50: float | None = None
    added_ttft_p99: float | None = None
    paired_ttft_p50: float | None = None
    paired_ttft_p99: float | None = None
    added_gap_p99: float | None = None
    cpu_seconds: float = 0.0
    cpu_per_1k: float | None = None
    cpu_share: float | None = None  # of one core, over the windows
    core1_share: float | None = None  # upstream + load generator, worst window
    foreign_load: float = 0.0  # cores used by other processes, worst window
    postgres_cpu_per_1k: float | None = None
    rss_per_stream: float | None = None  # bytes
    wall: float = 0.0
    answers: int = 0
    commits_per_answer: float | None = None
    statements_per_answer: float | None = None
    statements_by_kind: dict[str, float] = field(default_factory=dict)
    # Answers whose LLM call went out before the ask's statement (None: not recorded, as in
    # runs from before the bench kept the counter).
    early_calls_used: int | None = None
    within_limits: bool = False


@dataclass
class Run:
    meta: dict[str, Any]
    windows: list[dict[str, Any]]
    streams: list[dict[str, Any]]


def load(path: Path) -> Run:
    meta: dict[str, Any] = {}
    windows: list[dict[str, Any]] = []
    streams: list[dict[str, Any]] = []
    with gzip.open(path, "rt") as lines:
        for line in lines:
            item = json.loads(line)
            kind = item.pop("kind", None)
            if kind == "meta":
                meta = item
            elif kind == "window":
                windows.append(item)
            elif kind == "stream":
                streams.append(item)
    return Run(meta, windows, streams)


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def warm_up_streams(meta: dict[str, Any]) -> int:
    """How many streams each process held before the measured windows. Runs from before the
    warm-up grew to 50 streams did not record it: theirs was 5."""
    return int(meta.get("warm_up_streams", 5))


def build_cells(run: Run) -> dict[tuple[str, str, int], Cell]:
    by_window: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for stream in run.streams:
        by_window[int(stream["window"])].append(stream)
    idle = run.meta.get("db_idle", {})
    idle_seconds = float(idle.get("seconds", 0.0)) or None
    commits_rate = float(idle.get("commits", 0)) / idle_seconds if idle_seconds else 0.0
    statements_rate = float(idle.get("statements", 0)) / idle_seconds if idle_seconds else 0.0
    cells: dict[tuple[str, str, int], Cell] = {}
    gaps: dict[tuple[str, str, int], Histogram] = defaultdict(Histogram)
    late: dict[tuple[str, str, int], Histogram] = defaultdict(Histogram)
    ttfts: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    seeded: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    pg_cpu: dict[tuple[str, str, int], float] = defaultdict(float)
    db_commits: dict[tuple[str, str, int], float] = defaultdict(float)
    db_statements: dict[tuple[str, str, int], float] = defaultdict(float)
    has_statements: set[tuple[str, str, int]] = set()
    warmed = warm_up_streams(run.meta)
    for window in run.windows:
        key = (str(window["phase"]), str(window["config"]), int(window["level"]))
        cell = cells.setdefault(key, Cell(*key))
        if str(window["status"]).startswith("skipped"):
            cell.skipped = str(window["status"])
            continue
        cell.windows += 1
        loadgen = window["loadgen"]
        cell.wall += float(loadgen.get("wall", 0.0))
        gaps[key].merge(Histogram.from_json(loadgen.get("gaps", {})))
        late[key].merge(Histogram.from_json(loadgen.get("lateness", {})))
        for stream in by_window[int(window["id"])]:
            cell.streams += 1
            cell.chunks += int(stream["chunks"])
            if stream["error"] is not None:
                cell.errors += 1
                kind = str(stream["error"]).split(":")[0][:40]
                cell.error_kinds[kind] = cell.error_kinds.get(kind, 0) + 1
            elif int(stream["chunks"]) != int(stream["expected"]):
                cell.mismatched += 1
            # Held windows measure only the streams that ran while all N were open.
            if stream["ttft"] is not None and stream.get("measured", True):
                ttfts[key].append(float(stream["ttft"]))
                seeded[key][int(stream["seed"])] = float(stream["ttft"])
        target = cell.config
        cpu = window["cpu"]
        cell.cpu_seconds += float(cpu.get(target, 0.0))
        pg_cpu[key] += float(cpu.get("postgres", 0.0))
        wall = float(loadgen.get("wall", 0.0))
        if wall >= 2.0:  # /proc counts CPU in 10 ms ticks: too coarse for shorter windows
            share = (float(cpu.get("upstream", 0.0)) + float(loadgen["loadgen_cpu"])) / wall
            cell.core1_share = max(cell.core1_share or 0.0, share)
        cell.foreign_load = max(cell.foreign_load, float(window.get("foreign_load", 0.0)))
        peak = int(window["rss_peak"].get(target, 0))
        base = int(window["rss_before"].get(target, 0))
        # Up to the warm-up's streams the process has held as many before: no growth to see.
        if peak and base and int(window["level"]) > warmed:
            per_stream = max(0.0, (peak - base) / max(1, int(window["level"])))
            cell.rss_per_stream = max(cell.rss_per_stream or 0.0, per_stream)
        if window.get("db"):
            db = window["db"]
            answers = sum(v for k, v in window["metrics"].items() if k.startswith("turns_total"))
            cell.answers += int(answers)
            seconds = float(db.get("seconds", 0.0))
            db_commits[key] += float(db["commits"]) - commits_rate * seconds
            if "statements" in db:
                has_statements.add(key)
                db_statements[key] += float(db["statements"]) - statements_rate * seconds
            for series, value in window["metrics"].items():
                if series.startswith("db_statements_total"):
                    kind = series.split('kind="', 1)[-1].split('"', 1)[0]
                    cell.statements_by_kind[kind] = cell.statements_by_kind.get(kind, 0) + value
                elif series == 'llm_early_starts_total{outcome="used"}':
                    cell.early_calls_used = (cell.early_calls_used or 0) + int(value)

    for key, cell in cells.items():
        cell.ttft_p50 = percentile(ttfts[key], 50)
        cell.ttft_p99 = percentile(ttfts[key], 99)
        cell.gap_p50 = gaps[key].percentile(50)
        cell.gap_p99 = gaps[key].percentile(99)
        cell.late_p99 = late[key].percentile(99)
        if cell.chunks:
            cell.cpu_per_1k = cell.cpu_seconds / cell.chunks * 1000
            cell.postgres_cpu_per_1k = pg_cpu[key] / cell.chunks * 1000
        if cell.wall:
            cell.cpu_share = cell.cpu_seconds / cell.wall
        if cell.answers:
            cell.commits_per_answer = db_commits[key] / cell.answers
            if key in has_statements:
                cell.statements_per_answer = db_statements[key] / cell.answers
            cell.statements_by_kind = {
                k: v / cell.answers for k, v in sorted(cell.statements_by_kind.items())
            }
        else:
            cell.statements_by_kind = {}

    for (phase, config, level), cell in cells.items():
        floor = cells.get((phase, "upstream", level))
        if floor is None or config == "upstream":
            continue
        cell.added_ttft_p50 = _sub(cell.ttft_p50, floor.ttft_p50)
        cell.added_ttft_p99 = _sub(cell.ttft_p99, floor.ttft_p99)
        cell.added_gap_p99 = _sub(cell.gap_p99, floor.gap_p99)
        mine, theirs = seeded[(phase, config, level)], seeded[(phase, "upstream", level)]
        paired = [mine[s] - theirs[s] for s in mine.keys() & theirs.keys()]
        cell.paired_ttft_p50 = percentile(paired, 50)
        cell.paired_ttft_p99 = percentile(paired, 99)
        cell.within_limits = (
            cell.windows > 0
            and not cell.skipped
            and cell.errors == 0
            and cell.mismatched == 0
            and cell.added_ttft_p99 is not None
            and cell.added_ttft_p99 < LIMIT_TTFT_P99
            and cell.added_gap_p99 is not None
            and cell.added_gap_p99 < LIMIT_GAP_P99
        )
    return cells


def upstream_ok(cell: Cell) -> bool:
    late_ok = cell.phase not in PACED_PHASES or (
        cell.late_p99 is not None and cell.late_p99 < UPSTREAM_LATENESS_OK
    )
    share_ok = cell.core1_share is None or cell.core1_share < CORE_SHARE_OK
    return cell.windows > 0 and cell.errors == 0 and late_ok and share_ok


def highest_within_limits(
    cells: dict[tuple[str, str, int], Cell], config: str, phase: str = "paced"
) -> int:
    """Highest level of `phase` that meets every limit, with every level below it meeting them."""
    best = 0
    for level in sorted(level for p, c, level in cells if p == phase and c == config):
        if not cells[(phase, config, level)].within_limits:
            break
        best = level
    return best


def levels(cells: dict[tuple[str, str, int], Cell], phase: str) -> list[int]:
    return sorted({level for p, _, level in cells if p == phase})


def systems(cells: dict[tuple[str, str, int], Cell]) -> list[str]:
    present = {c for _, c, _ in cells}
    return [c for c in ("upstream", *PEERS) if c in present]


def top_cell(cells: dict[tuple[str, str, int], Cell], phase: str, config: str) -> Cell | None:
    """The cell of the most streams `config` ran in `phase`."""
    ran = [c for (p, k, _), c in sorted(cells.items()) if p == phase and k == config and c.windows]
    return max(ran, key=lambda c: c.level) if ran else None


def value_of(cell: Cell | None, name: str) -> float | None:
    if cell is None or cell.windows == 0:
        return None
    value = getattr(cell, name)
    return float(value) if isinstance(value, int | float) else None
