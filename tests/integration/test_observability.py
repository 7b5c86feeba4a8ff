"""Traces (to a real OTLP receiver), Prometheus metrics and JSON logs, read as operators would."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import FakeUpstream
from qna_gateway.telemetry import create_telemetry
from tests.conftest import Gateway, GatewayFactory, ServeProcess
from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan, serve_otlp, serve_otlp_grpc
from tests.sse import stream_events
from tests.unit.test_deploy_configs import DASHBOARD, dashboard_metric_names

SERVER, CLIENT = 2, 3  # OTLP SpanKind values
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
DEPOSIT_CALL = {"name": "search_knowledge_base", "arguments": '{"query": "tent deposit"}'}


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    yield from serve_otlp()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def ask_once(base_url: str, upstream: FakeUpstream, **headers: str) -> list[Any]:
    upstream.set_scenario(tool_calls=[DEPOSIT_CALL], tokens=12)
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        chat_id = (await client.post("/v1/chats", json={"title": "obs"})).json()["id"]
        return await stream_events(
            client,
            "POST",
            f"/v1/chats/{chat_id}/messages",
            json={"content": "How much is the tent deposit?"},
            headers=headers,
        )


def stop_gracefully(proc: ServeProcess) -> None:
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(timeout=30) == 0


async def test_one_ask_is_one_trace_with_http_llm_tool_and_db_spans(
    serve_factory: Callable[..., ServeProcess], upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    proc = serve_factory(
        OPENAI_BASE_URL=upstream.base_url,
        QNA_MODEL="fake-model",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_SERVICE_NAME="qna-test",
    )
    events = await ask_once(proc.base_url, upstream, traceparent=TRACEPARENT)
    assert events[-1].event == "message.completed", events[-1].data["error"]
    stop_gracefully(proc)  # the batch exporter flushes on the way out

    trace = [s for s in otlp.spans if s.trace_id == TRACE_ID]
    by_id = {s.span_id: s for s in trace}
    server = next(s for s in trace if s.kind == SERVER)
    assert server.name == "POST /v1/chats/{chat_id}/messages"
    assert server.parent_span_id == "00f067aa0ba902b7"  # the incoming traceparent's span
    assert server.attributes["http.route"] == "/v1/chats/{chat_id}/messages"
    assert server.attributes["http.response.status_code"] == 200
    assert server.service_name == "qna-test"

    def ancestors(span: ReceivedSpan) -> list[str]:
        names = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            names.append(span.name)
        return names

    answer = next(s for s in trace if s.name == "answer")
    assert answer.parent_span_id == server.span_id  # the turn stays in the request's trace
    llm = [s for s in trace if s.name == "chat fake-model"]
    assert len(llm) == 2  # the round that called the tool, and the one that answered
    for span in llm:
        assert span.kind == CLIENT
        assert span.parent_span_id == answer.span_id
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["gen_ai.provider.name"] == "openai"
        assert span.attributes["gen_ai.request.model"] == "fake-model"
        assert span.attributes["gen_ai.response.model"] == "fake-model"
        assert span.attributes["gen_ai.usage.output_tokens"] >= 0
        assert span.attributes["gen_ai.response.time_to_first_chunk"] >= 0
    finishes = sorted(s.attributes["gen_ai.response.finish_reasons"][0] for s in llm)
    assert finishes == ["stop", "tool_calls"]
    assert max(s.attributes["gen_ai.usage.output_tokens"] for s in llm) == 12

    tool = next(s for s in trace if s.name == "execute_tool search_knowledge_base")
    assert tool.parent_span_id == answer.span_id
    assert tool.attributes["gen_ai.tool.name"] == "search_knowledge_base"
    assert tool.attributes["gen_ai.tool.call.id"]

    db = [s for s in trace if s.attributes.get("db.system.name") == "postgresql"]
    operations = {s.attributes["db.operation.name"] for s in db}
    assert "WITH" in operations  # the ask, the writer's batches and the final write are CTEs
    texts = [s.attributes["db.query.text"] for s in db]
    assert any("INSERT INTO messages" in t for t in texts), "the ask's insert"
    assert any("status = 'streaming' RETURNING" in t and "completed_at" in t for t in texts), (
        "the final write"
    )
    search = [s for s in db if s.parent_span_id == tool.span_id]
    assert search, "the knowledge-base query is a child of the tool span"
    for span in db:
        text = span.attributes["db.query.text"]
        assert "%s" in text or "%(" in text or "$" not in text  # parametrised
        assert "tent deposit" not in text  # never the values
        assert "How much" not in text
        assert "answer" in ancestors(span) or server.name in ancestors(span)


async def test_tracing_is_off_without_an_endpoint(gateway: Gateway, otlp: OtlpReceiver) -> None:
    assert not gateway.app.state.telemetry.tracing
    chat_id = await gateway.create_chat()
    await gateway.client.post(f"/v1/chats/{chat_id}/messages", json={"content": "refund"})
    assert otlp.spans == []


async def test_metrics_after_known_traffic(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    events = await ask_once(gw.base_url, upstream)
    assert events[-1].event == "message.completed"
    missing = await gw.client.get("/v1/chats/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404
    await gw.client.get("/no/such/route")

    response = await gw.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = samples(response.text)
    ask = "/v1/chats/{chat_id}/messages"
    assert value(found, "http_requests_total", method="POST", endpoint=ask, status="200") == 1
    assert (
        value(found, "http_requests_total", method="POST", endpoint="/v1/chats", status="201") == 1
    )
    assert (
        value(
            found, "http_requests_total", method="GET", endpoint="/v1/chats/{chat_id}", status="404"
        )
        == 1
    )
    # Unknown paths share one label value: no cardinality explosion from scanners.
    assert (
        value(found, "http_requests_total", method="GET", endpoint="unmatched", status="404") == 1
    )
    assert value(found, "http_request_duration_seconds_count", method="POST", endpoint=ask) == 1
    assert value(found, "chat_sessions_total") == 1
    assert value(found, "messages_total", role="user") == 1
    assert value(found, "messages_total", role="assistant") == 1
    assert value(found, "llm_calls_total", status="success") == 2
    assert value(found, "llm_call_duration_seconds_count") == 2
    assert value(found, "knowledge_base_searches_total") >= 1
    assert value(found, "turns_total", status="completed") == 1
    assert value(found, "llm_tokens_relayed_total") == 12
    assert value(found, "llm_time_to_first_token_seconds_count") == 1
    assert value(found, "sse_open_streams") == 0
    # A stream that reached its terminal event is no disconnect.
    assert value(found, "sse_disconnects_total", reason="client") == 0
    assert value(found, "sse_disconnects_total", reason="reconnect") == 0
    assert value(found, "db_pool_connections", state="max") == gw.settings.db_pool_max
    assert value(found, "db_event_listener_up") == 1
    assert value(found, "db_statements_total", kind="finish") == 1


async def test_openmetrics_exposition_carries_exemplars(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    exporter = InMemorySpanExporter()
    gw = await gateway_factory(
        openai_base_url=upstream.base_url,
        model="fake-model",
        telemetry=create_telemetry({}, exporter=exporter),
    )
    await ask_once(gw.base_url, upstream)
    response = await gw.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = [
        line for line in response.text.splitlines()
        if line.startswith("http_request_duration_seconds_bucket") and " # {trace_id=" in line
    ]  # fmt: skip
    assert exemplars
    provider = gw.app.state.telemetry.provider
    assert provider is not None
    assert provider.force_flush()
    trace_ids = {span.context.trace_id for span in exporter.get_finished_spans()}
    exemplar_ids = {int(line.split('trace_id="')[1].split('"')[0], 16) for line in exemplars}
    assert exemplar_ids <= trace_ids


async def test_spans_go_out_over_otlp_grpc_too(
    serve_factory: Callable[..., ServeProcess], upstream: FakeUpstream
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: the same trace reaches a gRPC collector (Tempo's and
    the OpenTelemetry Collector's default port 4317 speaks it)."""
    for receiver in serve_otlp_grpc():
        proc = serve_factory(
            OPENAI_BASE_URL=upstream.base_url,
            QNA_MODEL="fake-model",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        )
        events = await ask_once(proc.base_url, upstream, traceparent=TRACEPARENT)
        assert events[-1].event == "message.completed", events[-1].data["error"]
        stop_gracefully(proc)  # the batch exporter flushes on the way out
        trace = [s for s in receiver.spans if s.trace_id == TRACE_ID]
        server = next(s for s in trace if s.kind == SERVER)
        assert server.name == "POST /v1/chats/{chat_id}/messages"
        answer = next(s for s in trace if s.name == "answer")
        assert answer.parent_span_id == server.span_id
        assert [s for s in trace if s.name == "chat fake-model"]
        assert server.service_name == "qna-gateway"


async def test_json_logs_carry_request_trace_and_chat_ids(
    serve_factory: Callable[..., ServeProcess], upstream: FakeUpstream, otlp: OtlpReceiver
) -> None:
    proc = serve_factory(
        OPENAI_BASE_URL=upstream.base_url,
        QNA_MODEL="fake-model",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.endpoint,
        QNA_LOG_FORMAT="json",
    )
    events = await ask_once(
        proc.base_url, upstream, traceparent=TRACEPARENT, **{"X-Request-ID": "req-abc-123"}
    )
    chat_id = events[-1].data["chat_id"]
    stop_gracefully(proc)
    lines = [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    assert lines, proc.log()
    for entry in lines:
        assert {"timestamp", "level", "message", "logger"} <= entry.keys()
    access = [
        e
        for e in lines
        if e["logger"] == "qna_gateway.access" and e.get("request_id") == "req-abc-123"
    ]
    assert len(access) == 1
    assert access[0]["trace_id"] == TRACE_ID
    assert access[0]["span_id"]
    assert access[0]["duration_ms"] > 0
    assert access[0]["status"] == 200
    assert access[0]["chat_id"] == chat_id
    ended = [e for e in lines if "ended completed" in e["message"]]
    assert ended
    assert ended[0]["request_id"] == "req-abc-123"  # the turn keeps its request's id
    assert ended[0]["chat_id"] == chat_id
    assert ended[0]["trace_id"] == TRACE_ID
    # uvicorn's own lines come out as JSON too, and no line holds message contents.
    assert any(e["logger"].startswith("uvicorn") for e in lines)
    assert not any("How much is the tent deposit" in json.dumps(e) for e in lines)


async def test_every_metric_the_dashboard_queries_is_on_metrics(
    gateway_factory: GatewayFactory, upstream: FakeUpstream
) -> None:
    gw = await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")
    await ask_once(gw.base_url, upstream)
    exposed: set[str] = set()
    for family in text_string_to_metric_families((await gw.client.get("/metrics")).text):
        # The parser names counters without _total; queries use the sample names.
        exposed.update({family.name, *(sample.name for sample in family.samples)})
    wanted = dashboard_metric_names(DASHBOARD)
    assert wanted
    assert wanted <= exposed, wanted - exposed
