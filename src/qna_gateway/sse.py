"""The SSE response: whole events written to the ASGI `send` the moment they are emitted.

A stream's producer calls `emit(chunk)` from wherever the news is, usually the LLM
connection's callback as a token arrives (through the turn and its listeners): the chunk is
written to the client's connection then and there, without waking the request's task and every
frame of the ASGI stack above it (with the queue it came through, that wake-up was a quarter of
the calls per relayed token, counted with cProfile). Only when the client's connection is
slow (the server's send waits for the transport to drain) does a task take over the sending,
and emits queue behind it in order. One helper task per stream does the rare things: notice the
client leaving, ping an idle stream, drop a client that stopped reading.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any, Protocol

from .middleware import RAW_SEND

log = logging.getLogger(__name__)

PING = b": ping\n\n"

Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]


class EventSink(Protocol):
    """Where a stream's producer puts its events (the `EventStreamResponse`)."""

    def emit(self, chunk: bytes) -> None:
        """Send `chunk` after everything emitted before it, without waiting."""

    async def drained(self) -> None:
        """Return once everything emitted so far is sent."""


class EventStreamResponse:
    """An ASGI app running `produce(self)` and sending each chunk (whole SSE events) it emits.

    - the stream ends when `produce` returns, once everything it emitted is sent;
    - a comment ping after `ping_seconds` without an event, so proxies keep the connection;
    - a client that leaves ends the stream at once (`produce` is cancelled, so its cleanup
      runs);
    - a send blocked for `send_timeout` (the client stopped reading) drops the connection
      instead of buffering without end;
    - `on_close` runs once, whichever way the stream ends.
    """

    def __init__(
        self,
        produce: Callable[[EventSink], Awaitable[None]],
        *,
        headers: Mapping[str, str],
        ping_seconds: float,
        send_timeout: float,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._produce = produce
        self._headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]
        self._ping = ping_seconds
        self._send_timeout = send_timeout
        self._on_close = on_close
        self._send: Send | None = None
        self._main: asyncio.Task[Any] | None = None
        # While a send waits for the transport, later chunks wait here, in order.
        self._sender: asyncio.Task[None] | None = None
        self._backlog: list[bytes] = []
        self._last_sent = 0.0
        self._sending_since: float | None = None
        self._closed = False
        self._gone: str | None = None

    async def __call__(self, scope: Any, receive: Receive, send: Send) -> None:
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        loop = self._loop = asyncio.get_running_loop()
        main = self._main = asyncio.current_task()
        assert main is not None
        watcher: asyncio.Task[None] | None = None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            # Once started, the body goes straight to the server: two wrappers fewer per event.
            send = scope.get(RAW_SEND, send)
            self._last_sent = loop.time()
            self._send = send
            watcher = asyncio.create_task(self._watch(receive))
            await self._produce(self)
            await self.drained()
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
            if self._sender is not None:
                self._sender.cancel()
            if self._on_close is not None:
                self._on_close()
        if self._gone == "stalled":
            # Returning without ending the response makes the server close the connection.
            log.warning("dropped an event stream whose client stopped reading")

    def emit(self, chunk: bytes) -> None:
        """Send `chunk` after everything emitted before it: now, unless a send is waiting for
        the transport. Any task may call it; once the stream has ended it does nothing."""
        if self._closed or self._send is None:
            return
        if self._sender is not None:
            self._backlog.append(chunk)
            return
        now = self._sending_since = self._loop.time()
        pending = self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        # The server's send finishes without waiting unless the transport's buffer is full:
        # run it here, and hand it to a task only if it does wait.
        try:
            rest = _run_until_it_waits(pending)
        except Exception:
            log.exception("sending an event failed")
            self._stop("failed")
            return
        if rest is None:
            self._sending_since = None
            self._last_sent = now
        else:
            self._sender = self._loop.create_task(self._send_rest(rest))

    async def drained(self) -> None:
        while self._sender is not None:
            await self._sender

    async def _send_rest(self, rest: Awaitable[None]) -> None:
        """Finish a send that waits for the transport, then send the backlog."""
        try:
            await rest
            while self._backlog and not self._closed:
                body = b"".join(self._backlog)
                self._backlog.clear()
                self._sending_since = self._loop.time()
                assert self._send is not None
                await self._send({"type": "http.response.body", "body": body, "more_body": True})
            self._last_sent = self._loop.time()
            self._sending_since = None
        except Exception:
            log.exception("sending an event failed")
            self._stop("failed")
        finally:
            self._sender = None

    def _stop(self, reason: str) -> None:
        if self._gone is None and not self._closed and self._main is not None:
            self._gone = reason
            self._main.cancel()

    async def _watch(self, receive: Receive) -> None:
        loop = self._loop
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
                    self._stop("client")
                    return
                continue
            now = loop.time()
            if self._sending_since is not None and now - self._sending_since >= self._send_timeout:
                self._stop("stalled")
                return
            if self._sending_since is None and now - self._last_sent >= self._ping:
                self.emit(PING)


def _run_until_it_waits(awaitable: Awaitable[None]) -> Awaitable[None] | None:
    """Run a coroutine in the calling task until it finishes (None) or waits; then return
    the rest of it, for a task of its own to await."""
    # The exact type: an ABC check costs more than the rest of an emit.
    if not isinstance(awaitable, types.CoroutineType):  # not a coroutine: a task runs all of it
        return awaitable
    try:
        waiting = awaitable.send(None)
    except StopIteration:
        return None
    return _carry_on(awaitable, waiting)


@types.coroutine
def _carry_on(coro: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    """The rest of `coro`, which last yielded `waiting` (a future, for asyncio): what the
    awaiting task sends or throws goes on to `coro`, as `await` does for one not started."""
    while True:
        try:
            value = yield waiting
        except BaseException as exc:
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting = coro.send(value)
            except StopIteration:
                return
