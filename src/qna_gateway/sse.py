"""The SSE response: an event stream's chunks written straight to the ASGI `send`.

sse-starlette ran every response as a task group and wrapped each send in a timeout scope; at
hundreds of streams that per-event cost was about a tenth of the gateway's CPU
(bench/results/profile.md). Here the hot path is a lock and a send per event, and one helper
task per stream does the rare things: notice the client leaving, ping an idle stream, drop a
client that stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from .middleware import RAW_SEND

log = logging.getLogger(__name__)

PING = b": ping\n\n"

Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


class EventStreamResponse:
    """An ASGI app sending `chunks` (whole SSE events) as they come.

    - a comment ping after `ping_seconds` without an event, so proxies keep the connection;
    - a client that leaves ends the stream at once (the chunk generator is closed, so its
      cleanup runs);
    - a send blocked for `send_timeout` (the client stopped reading) drops the connection
      instead of buffering without end;
    - `on_close` runs once, whichever way the stream ends.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[bytes],
        *,
        headers: Mapping[str, str],
        ping_seconds: float,
        send_timeout: float,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]
        self._ping = ping_seconds
        self._send_timeout = send_timeout
        self._on_close = on_close
        self._lock = asyncio.Lock()
        self._last_sent = 0.0
        self._sending_since: float | None = None
        self._closed = False
        self._gone: str | None = None

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        loop = self._loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        watcher: asyncio.Task[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            # Once started, the body goes straight to the server: two wrappers fewer per event.
            send = scope.get(RAW_SEND, send)
            self._last_sent = loop.time()
            watcher = asyncio.create_task(self._watch(receive, send, main))
            async for chunk in self._chunks:
                async with self._lock:
                    await self._send_body(send, chunk)
            async with self._lock:
                self._closed = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            # Our own cancel (the client left or stopped reading) ends the response quietly.
            if self._gone is None or main.uncancel() > 0:
                raise
        finally:
            self._closed = True
            if watcher is not None:
                watcher.cancel()
            with contextlib.suppress(Exception):
                await self._chunks.aclose()  # its cleanup, if a send was cut
            if self._on_close is not None:
                self._on_close()
        if self._gone == "stalled":
            # Returning without ending the response makes the server close the connection.
            log.warning("dropped an event stream whose client stopped reading")

    async def _send_body(self, send: Send, body: bytes) -> None:
        now = self._loop.time()
        self._sending_since = now
        await send({"type": "http.response.body", "body": body, "more_body": True})
        self._sending_since = None
        self._last_sent = now

    def _stop(self, main: asyncio.Task[Any], reason: str) -> None:
        if self._gone is None and not self._closed:
            self._gone = reason
            main.cancel()

    async def _watch(self, receive: Receive, send: Send, main: asyncio.Task[Any]) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            # While a send runs no ping is needed, only a limit on how long it may take.
            if self._sending_since is not None:
                wake = self._sending_since + self._send_timeout
            else:
                wake = self._last_sent + self._ping
            try:
                message = await asyncio.wait_for(receive(), max(wake - loop.time(), 0))
            except TimeoutError:
                pass
            else:
                if message["type"] == "http.disconnect":
                    self._stop(main, "client")
                    return
                continue
            now = loop.time()
            if self._sending_since is not None and now - self._sending_since >= self._send_timeout:
                self._stop(main, "stalled")
                return
            if now - self._last_sent >= self._ping and not self._lock.locked():
                async with self._lock:  # free, so taken at once
                    if self._closed:
                        return
                    try:
                        await asyncio.wait_for(self._send_body(send, PING), self._send_timeout)
                    except TimeoutError:
                        self._stop(main, "stalled")
                        return
