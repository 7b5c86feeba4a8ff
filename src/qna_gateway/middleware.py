"""The outermost ASGI layer: request id, the server span, HTTP metrics and the access log."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .errors import PROBLEM_JSON
from .schemas import Problem
from .telemetry import Telemetry, exemplar_of, request_id_var

log = logging.getLogger("qna_gateway.access")

_propagator = TraceContextTextMapPropagator()
_TYPED_PARAM = re.compile(r"\{(\w+):\w+\}")
_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
UNMATCHED = "unmatched"
RAW_SEND = "qna.raw_send"

Scope = dict[str, Any]
ASGIApp = Any


def route_template(scope: Scope) -> str:
    """The matched route as a template (`/v1/chats/{chat_id}`): bounded label values."""
    template = scope.get("path_template")
    if not template:
        return UNMATCHED
    return _TYPED_PARAM.sub(r"{\1}", str(template))


class ObservabilityMiddleware:
    """Wraps the app's ASGI handler (inside it routing has happened, so the route template is
    in the scope when the response starts)."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry, *, max_header_bytes: int) -> None:
        self.app = app
        self.telemetry = telemetry
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if sum(len(k) + len(v) for k, v in scope["headers"]) > self.max_header_bytes:
            # uvicorn/httptools set no limit of their own; the ingress should, too.
            await _refuse_headers(send, self.max_header_bytes)
            self.telemetry.metrics.http_requests.labels(scope["method"], UNMATCHED, "431").inc()
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        method = scope["method"]
        started = time.perf_counter()
        status = 500
        parent = _propagator.extract(headers)
        span = self.telemetry.tracer.start_span(
            f"{method}", kind=SpanKind.SERVER, context=parent,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                "url.scheme": scope.get("scheme", "http"),
                "http.request.header.x_request_id": request_id,
            },
        )  # fmt: skip
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        request_token = request_id_var.set(request_id)

        async def send_with_request_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        # The server's own send, for a streaming response's body messages: they need nothing
        # from the layers in between (this one and Litestar's only look at the start).
        scope[RAW_SEND] = send
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            # The scope is the server's (uvicorn's request cycle holds it) and `send` is a bound
            # method of that cycle: left in, the pair is a reference cycle, so every request's
            # cycle, transport and headers would wait for the garbage collector, whose full
            # passes stall the event loop (bench/results/profile-stalls.md).
            scope.pop(RAW_SEND, None)
            duration = time.perf_counter() - started
            endpoint = route_template(scope)
            span.update_name(f"{method} {endpoint}")
            span.set_attribute("http.route", endpoint)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            metrics = self.telemetry.metrics
            metrics.http_requests.labels(method, endpoint, str(status)).inc()
            metrics.http_duration.labels(method, endpoint).observe(
                duration, exemplar_of(span.get_span_context())
            )
            # Logged inside the span's context, so the line carries its trace id.
            log.info(
                "%s %s %d",
                method,
                scope["path"],
                status,
                extra={
                    "chat_id": scope.get("path_params", {}).get("chat_id"),
                    "method": method,
                    "path": scope["path"],
                    "endpoint": endpoint,
                    "status": status,
                    "duration_ms": round(duration * 1000, 2),
                },
            )
            span.end()
            otel_context.detach(token)
            request_id_var.reset(request_token)


async def _refuse_headers(send: Any, limit: int) -> None:
    body = msgspec.json.encode(
        Problem(
            status=431,
            title="Request header fields too large",
            detail=f"The request headers are larger than the limit of {limit} bytes.",
        )
    )
    await send(
        {
            "type": "http.response.start",
            "status": 431,
            "headers": [
                (b"content-type", PROBLEM_JSON.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
