"""Loaded by the gateway's Python at start-up when `bench.profile_gateway --timeline` puts this
folder on its PYTHONPATH: SIGUSR1 starts stamping asks, the next SIGUSR1 stops and writes
$QNA_BENCH_TIMELINE (JSON, one record per ask that reached its first delta).

Each SSE ask is followed through the gateway by its client's port: when uvicorn received it,
when the middleware and the turn manager took it, when the request to the LLM went out, when
the first token came in from the LLM and when its delta went out to the client. The added
time to first token that the benchmark measures from outside also holds the harness's own
hops (the fake upstream and the load generator share a core); these stamps say which part
the gateway spends. The wrappers cost a few microseconds an ask; nothing runs per token but
a dictionary lookup on the LLM connection's data and the stream's emits.
"""

import contextvars
import json
import os
import re
import signal
import time
import types
from typing import Any

_path = os.environ.get("QNA_BENCH_TIMELINE")
_port: contextvars.ContextVar[int | None] = contextvars.ContextVar("timeline_port", default=None)
_open: dict[int, dict[str, float]] = {}  # client port -> the ask's stamps so far
_by_connection: dict[int, dict[str, float]] = {}  # id(LLM connection) -> stamps
_by_response: dict[int, dict[str, float]] = {}  # id(event stream response) -> stamps
_done: list[dict[str, float]] = []
_on = False
_clock = time.perf_counter  # the load generator's clock too (CLOCK_MONOTONIC on Linux)
_TOKEN = re.compile(rb'"content":"[^"]')  # a chunk with text (the role's first chunk has none)


def _stamp(name: str) -> dict[str, float] | None:
    port = _port.get()
    record = _open.get(port) if port is not None else None
    if record is not None and name not in record:
        record[name] = _clock()
    return record


def _install() -> None:
    from uvicorn.protocols.http import httptools_impl

    from qna_gateway import middleware, sse, turn_manager, upstream_http

    received = httptools_impl.HttpToolsProtocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        if _on and self.client and data.startswith(b"POST "):
            _open[self.client[1]] = {"received": _clock(), "port": self.client[1]}
        received(self, data)

    httptools_impl.HttpToolsProtocol.data_received = data_received  # type: ignore[method-assign]

    call = middleware.ObservabilityMiddleware.__call__

    async def middleware_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if client and client[1] in _open:
            _port.set(client[1])
            _stamp("middleware")
        await call(self, scope, receive, send)

    middleware.ObservabilityMiddleware.__call__ = middleware_call  # type: ignore[method-assign]

    start_turn = turn_manager.TurnManager.start_turn

    async def stamped_start_turn(self: Any, **kwargs: Any) -> Any:
        _stamp("turn")
        return await start_turn(self, **kwargs)

    turn_manager.TurnManager.start_turn = stamped_start_turn  # type: ignore[method-assign]

    handle = upstream_http.Http11Transport.handle_async_request

    async def handle_async_request(self: Any, request: Any) -> Any:
        _stamp("transport")
        return await handle(self, request)

    upstream_http.Http11Transport.handle_async_request = handle_async_request  # type: ignore[method-assign]

    send = upstream_http._Connection.send

    def connection_send(self: Any, data: bytes) -> None:
        record = _stamp("llm_request")
        if record is not None:
            _by_connection[id(self)] = record
        send(self, data)

    upstream_http._Connection.send = connection_send  # type: ignore[method-assign]

    llm_data = upstream_http._Connection.data_received

    def connection_data(self: Any, data: bytes) -> None:
        record = _by_connection.get(id(self))
        if record is not None and _TOKEN.search(data):
            record["llm_token"] = _clock()
            del _by_connection[id(self)]
        llm_data(self, data)

    upstream_http._Connection.data_received = connection_data  # type: ignore[method-assign]

    respond = sse.EventStreamResponse.__call__

    async def response_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        port = _port.get()
        record = _open.pop(port, None) if port is not None else None
        if record is not None:
            _by_response[id(self)] = record
        await respond(self, scope, receive, send)

    sse.EventStreamResponse.__call__ = response_call  # type: ignore[method-assign]

    emit = sse.EventStreamResponse.emit

    def stamped_emit(self: Any, chunk: bytes) -> None:
        emit(self, chunk)
        if b"event: message.delta" in chunk[:120]:
            record = _by_response.pop(id(self), None)
            if record is not None:
                record["delta_out"] = _clock()
                _done.append(record)

    sse.EventStreamResponse.emit = stamped_emit  # type: ignore[method-assign]


def _toggle(signum: int, frame: types.FrameType | None) -> None:
    global _on
    _on = not _on
    if not _on and _path:
        complete = [r for r in _done if "llm_token" in r and "llm_request" in r]
        with open(_path + ".part", "w") as out:
            json.dump(complete, out)
        os.replace(_path + ".part", _path)
        _done.clear()


if _path:
    _install()
    signal.signal(signal.SIGUSR1, _toggle)
