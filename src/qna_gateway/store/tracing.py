"""A psycopg cursor that wraps each statement in a span: parametrised text, never the values."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from psycopg import AsyncCursor

from ..telemetry import DB

MAX_QUERY_TEXT = 2_000


def _text(query: Any) -> str:
    if isinstance(query, bytes):
        return query.decode(errors="replace")
    return str(query)


def traced_cursor_class(tracer: trace.Tracer) -> type[AsyncCursor[Any]]:
    """A cursor class for `AsyncConnection(cursor_factory=...)`, bound to `tracer`.

    Only installed when tracing is on, so statements cost nothing extra otherwise.
    """

    def span(query: Any, **attributes: Any) -> Any:
        text = _text(query)
        operation = (text.split(None, 1) or ["SQL"])[0].upper()
        return tracer.start_as_current_span(
            f"{operation} postgresql",
            kind=SpanKind.CLIENT,
            attributes={
                DB.SYSTEM: "postgresql",
                DB.OPERATION: operation,
                DB.QUERY_TEXT: text[:MAX_QUERY_TEXT],
                **attributes,
            },
        )

    class TracedCursor(AsyncCursor[Any]):
        async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> TracedCursor:
            with span(query):
                await super().execute(query, params, **kwargs)
            return self

        async def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
            with span(query, **{"db.operation.batch.size": len(params_seq)}):
                await super().executemany(query, params_seq, **kwargs)

    return TracedCursor
