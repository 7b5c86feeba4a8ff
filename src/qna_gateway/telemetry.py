"""Tracing set-up from the standard OTEL_* variables, and the span attribute names we use."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from .metrics import Metrics, create_metrics

log = logging.getLogger(__name__)

SERVICE_NAME = "qna-gateway"

# The request a log line or a span belongs to; tasks started by a request (its turn) inherit it.
request_id_var: ContextVar[str | None] = ContextVar("qna_request_id", default=None)
chat_id_var: ContextVar[str | None] = ContextVar("qna_chat_id", default=None)


class GenAI:
    """OpenTelemetry GenAI semantic-convention attribute names, in one place."""

    OPERATION = "gen_ai.operation.name"
    PROVIDER = "gen_ai.provider.name"
    REQUEST_MODEL = "gen_ai.request.model"
    RESPONSE_MODEL = "gen_ai.response.model"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    FINISH_REASONS = "gen_ai.response.finish_reasons"
    TOOL_NAME = "gen_ai.tool.name"
    TOOL_CALL_ID = "gen_ai.tool.call.id"
    ERROR_TYPE = "error.type"
    # Not (yet) a convention: time from the request to the first streamed chunk.
    TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"


class DB:
    SYSTEM = "db.system.name"
    OPERATION = "db.operation.name"
    QUERY_TEXT = "db.query.text"


@dataclass
class Telemetry:
    """The app's tracer and metrics. `provider` is None when tracing is off (no endpoint)."""

    tracer: trace.Tracer
    metrics: Metrics
    provider: TracerProvider | None = None

    @property
    def tracing(self) -> bool:
        return self.provider is not None

    def shutdown(self) -> None:
        """Export what is queued, then stop; called last at exit so no span is lost."""
        if self.provider is not None:
            self.provider.force_flush(timeout_millis=5_000)
            self.provider.shutdown()


def exemplar_of(context: trace.SpanContext | None) -> dict[str, str] | None:
    """`{"trace_id": ...}` of the span `context`, when it is a recorded span's."""
    if context is None or not context.is_valid:
        return None
    return {"trace_id": f"{context.trace_id:032x}"}


def tracing_configured(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).lower()
    # Both exporters read their endpoint, headers, timeout and TLS settings from OTEL_*.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not grpc or http/protobuf")


def create_telemetry(
    environ: Mapping[str, str] | None = None, *, exporter: SpanExporter | None = None
) -> Telemetry:
    """Tracing when an OTLP endpoint is configured (or an exporter is given), else a no-op
    tracer that costs nothing; metrics always."""
    env = os.environ if environ is None else environ
    metrics = create_metrics()
    if exporter is None and not tracing_configured(env):
        return Telemetry(trace.NoOpTracer(), metrics)
    resource = Resource.create(
        {} if env.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    )
    # The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (SDK default:
    # parent-based, always on).
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter or _otlp_exporter(env)))
    log.info("tracing on: exporting spans over OTLP")
    return Telemetry(provider.get_tracer("qna_gateway"), metrics, provider)
