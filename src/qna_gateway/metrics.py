"""Prometheus metrics: the names DESIGN.md lists, on a registry the app owns."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector

# LLM latencies span tens of milliseconds (first token from a local model) to minutes (long
# answers); HTTP latencies of streaming endpoints are as long as the answer.
LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 4, 8, 15)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass(frozen=True)
class Metrics:
    """Every metric the gateway exports. One instance per app (tests build their own)."""

    registry: CollectorRegistry
    http_requests: Counter
    http_duration: Histogram
    chat_sessions: Counter
    messages: Counter
    llm_calls: Counter
    llm_early_starts: Counter
    llm_duration: Histogram
    kb_searches: Counter
    open_streams: Gauge
    time_to_first_token: Histogram
    tokens_relayed: Counter
    resumes: Counter
    disconnects: Counter
    turns: Counter
    db_statements: Counter
    extra_collectors: list[Collector] = field(default_factory=list)

    def watch_pool(self, get_stats: Callable[[], Mapping[str, int]]) -> None:
        self._watch(_PoolCollector(get_stats))

    def watch_event_listener(self, connected: Callable[[], bool]) -> None:
        self._watch(_ListenerCollector(connected))

    def _watch(self, collector: Collector) -> None:
        # Services brought up again (a retried start) replace what they watched before.
        for old in [c for c in self.extra_collectors if type(c) is type(collector)]:
            self.extra_collectors.remove(old)
            self.registry.unregister(old)
        self.extra_collectors.append(collector)
        self.registry.register(collector)

    def render(self, *, openmetrics: bool) -> tuple[bytes, str]:
        """The exposition and its content type; OpenMetrics carries the exemplars."""
        registry = self.registry
        if os.environ.get(MULTIPROC_ENV):
            # Several processes: each writes its own files; one scrape adds them up. The pool
            # statistics and the listener's state are this process's own.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            for collector in self.extra_collectors:
                registry.register(collector)
        if openmetrics:
            return (
                openmetrics_exposition.generate_latest(registry),  # type: ignore[no-untyped-call]
                openmetrics_exposition.CONTENT_TYPE_LATEST,
            )
        return generate_latest(registry), CONTENT_TYPE_LATEST


def _with_known_labels(metrics: Metrics) -> Metrics:
    """Create every known label set at 0, so dashboards show 0 rather than "No data"."""
    for status in ("success", "error"):
        metrics.llm_calls.labels(status)
    for outcome in ("used", "abandoned"):
        metrics.llm_early_starts.labels(outcome)
    for status in ("completed", "failed", "cancelled", "interrupted"):
        metrics.turns.labels(status)
    for reason in ("client", "reconnect"):
        metrics.disconnects.labels(reason)
    for role in ("user", "assistant"):
        metrics.messages.labels(role)
    for kind in ("append", "rewrite", "tool_event", "finish"):
        metrics.db_statements.labels(kind)
    return metrics


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    registry = registry or CollectorRegistry(auto_describe=True)
    metrics = Metrics(
        registry=registry,
        http_requests=Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status code.",
            ["method", "endpoint", "status"],
            registry=registry,
        ),
        http_duration=Histogram(
            "http_request_duration_seconds",
            "HTTP request duration by method and route template (streams: until they end).",
            ["method", "endpoint"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        ),
        chat_sessions=Counter("chat_sessions_total", "Chats created.", registry=registry),
        messages=Counter(
            "messages_total", "Messages stored, by role.", ["role"], registry=registry
        ),
        llm_calls=Counter(
            "llm_calls_total",
            "Chat-completions calls to the LLM (one per tool round), by outcome: success or error.",
            ["status"],
            registry=registry,
        ),
        llm_early_starts=Counter(
            "llm_early_starts_total",
            "LLM calls sent while the question was being stored, by outcome: used, or"
            " abandoned (the history read differed from the one expected, or the ask failed).",
            ["outcome"],
            registry=registry,
        ),
        llm_duration=Histogram(
            "llm_call_duration_seconds",
            "Duration of one LLM call, from request to the last chunk.",
            buckets=LLM_BUCKETS,
            registry=registry,
        ),
        kb_searches=Counter(
            "knowledge_base_searches_total", "Knowledge-base searches.", registry=registry
        ),
        open_streams=Gauge(
            "sse_open_streams",
            "SSE responses open now.",
            registry=registry,
            multiprocess_mode="livesum",  # live streams add up across workers
        ),
        time_to_first_token=Histogram(
            "llm_time_to_first_token_seconds",
            "From the start of an answer to its first text.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        ),
        tokens_relayed=Counter(
            "llm_tokens_relayed_total",
            "Text pieces (deltas) received from the answerer and relayed to subscribers"
            " (added 16 at a time while an answer streams, the rest when it ends).",
            registry=registry,
        ),
        resumes=Counter(
            "sse_resumes_total",
            "Streams opened with a Last-Event-ID (reconnections).",
            registry=registry,
        ),
        disconnects=Counter(
            "sse_disconnects_total",
            "Streams that ended before their terminal event, by reason.",
            ["reason"],
            registry=registry,
        ),
        turns=Counter(
            "turns_total", "Answers ended, by final status.", ["status"], registry=registry
        ),
        db_statements=Counter(
            "db_statements_total",
            "Statements that store streamed answers, by kind (append: one per writer round,"
            " covering every running answer; finish, tool_event, rewrite: one per answer).",
            ["kind"],
            registry=registry,
        ),
    )
    return _with_known_labels(metrics)


class _PoolCollector(Collector):
    """The psycopg pool's own statistics, read at scrape time."""

    def __init__(self, get_stats: Callable[[], Mapping[str, int]]) -> None:
        self._get_stats = get_stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._get_stats()
        family = GaugeMetricFamily(
            "db_pool_connections",
            "Connection pool: open connections (size), idle ones, requests waiting, the maximum.",
            labels=["state"],
        )
        family.add_metric(["size"], stats.get("pool_size", 0))
        family.add_metric(["idle"], stats.get("pool_available", 0))
        family.add_metric(["waiting"], stats.get("requests_waiting", 0))
        family.add_metric(["max"], stats.get("pool_max", 0))
        yield family


class _ListenerCollector(Collector):
    """Whether this process's LISTEN connection is up, read at scrape time: while it is not,
    the process misses other replicas' cancels and its followers poll the table."""

    def __init__(self, connected: Callable[[], bool]) -> None:
        self._connected = connected

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "db_event_listener_up",
            "1 while this process's LISTEN connection to PostgreSQL is up, 0 while it reconnects.",
            value=1 if self._connected() else 0,
        )
