"""HTTP/1.1 to the LLM: a lean httpx2 transport on an asyncio protocol and httptools.

An answer is one socket read per token. Through httpcore2 every read went through its
connection state machine (h11) and several stream layers, and together they cost more than
the rest of relaying a token (bench/results/profile.md). Here the bytes are parsed by
httptools (llhttp, in C) in the protocol callback as they arrive; the body stream hands over
whatever has been decoded since the last read, or (`follow`) hands each piece to a callback
as it is decoded, so that relaying a token wakes no task at all.

It speaks what the LLM client needs and nothing more: HTTP/1.1 over TCP or TLS, one request
at a time per connection, idle keep-alive connections reused per origin, the connect and
read timeouts httpx2 passes in each request. No proxies and no HTTP/2: llm.py leaves a
configured proxy to httpx2's own transport.

With `spare=1` it keeps a connection ready for the next request, as Envoy's preconnect
policy does: a request that takes the last idle connection (or finds none) opens one more in
the background. Servers close idle connections (uvicorn, under vLLM, after 5 s), so after a
quiet spell each request of a burst would otherwise wait for a connect of its own, and in a
busy event loop a connect takes a turn or two of the loop: 2-5 ms before the request went
out, measured in the gateway at 50 streams. With a spare only the burst's first request waits.

    transport = Http11Transport()
    client = httpx2.AsyncClient(transport=transport)   # or openai's http_client=
"""

from __future__ import annotations

import asyncio
import functools
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import httptools
import httpx2

# Stop reading from the socket while this much body is buffered and not yet consumed.
HIGH_WATER = 256 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]

# The response extension that holds the body stream, for `raw_reader`.
BODY_EXTENSION = "qna_gateway.body"


class _Connection(asyncio.Protocol):
    """One connection and the response being read on it (httptools calls the `on_*` methods
    from inside `feed_data`)."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        # Kept: on Python 3.11 every get_running_loop() is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.busy = False  # a request is out and its response not fully read
        self.closed = False
        self.error: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_complete = False
        self.until_close = False  # a body with neither a length nor chunks ends at EOF
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.reading_paused = False
        self.waiter: asyncio.Future[None] | None = None
        # Set by `_Body.follow`: the body goes to it as httptools decodes it, not to `body`.
        self.listener: Callable[[bytes], bool] | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: an idle connection is not to be trusted again
            self.fail("the LLM sent data nobody asked for")
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"the LLM sent malformed HTTP: {exc}")
            return
        if self.listener is not None and not self.complete:
            return  # the listener took the body; its reader has no news
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        if self.until_close and self.headers_complete:
            self.complete = True
        self.fail("the LLM closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(str(exc) if exc else "the LLM closed the connection")

    # -- httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_complete = True
        names = {name.lower() for name, _ in self.headers}
        status = self.parser.get_status_code()
        self.until_close = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and status not in (204, 304)
            and status >= 200
        )

    def on_body(self, body: bytes) -> None:
        listener = self.listener
        if listener is None:
            self.body.append(body)
            self.buffered += len(body)
        elif listener(body):  # it has had what it wanted: the rest is buffered for a read
            self.listener = None
            self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked now: once the message is complete the parser starts over for the next one.
        self.keep_alive = self.parser.should_keep_alive()

    # -- for the transport and the body stream

    def fail(self, error: str) -> None:
        """Close the connection; `error` says why to whoever reads from it next."""
        self.closed = True
        if self.error is None:
            self.error = error
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def reusable(self) -> bool:
        """For a connection taken from the idle list: still open, and nothing came in while it
        sat there (readable then means the server closed it, or sent what nobody asked for)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not poller.poll(0)

    def send(self, data: bytes) -> None:
        self._reset()
        self.busy = True
        assert self.transport is not None
        self.transport.write(data)

    async def wait(self, seconds: float | None, request: httpx2.Request) -> None:
        """Until the protocol has news (data, the end, an error), at most `seconds`."""
        loop = self.loop
        waiter = self.waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise httpx2.ReadTimeout("timed out reading from the LLM", request=request) from None
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def take(self) -> bytes:
        """Everything decoded since the last call, as one piece."""
        body = self.body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return data


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class _Body(httpx2.AsyncByteStream):
    def __init__(
        self,
        transport: Http11Transport,
        connection: _Connection,
        request: httpx2.Request,
        timeout: float | None,
    ) -> None:
        self._transport = transport
        self._connection = connection
        self._request = request
        self._timeout = timeout

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while data := await self.read(self._timeout):
            yield data

    async def read(self, seconds: float | None) -> bytes:
        """Whatever arrived since the last read, waiting at most `seconds` for some; b"" at
        the body's end. For a caller that reads the body itself, past httpx2's iterators."""
        connection = self._connection
        while True:
            if connection.body:
                return connection.take()
            if connection.complete:
                return b""
            if connection.closed:
                raise self._ended_early()
            await connection.wait(seconds, self._request)

    async def follow(self, on_data: Callable[[bytes], bool]) -> None:
        """Hand the body to `on_data` piece by piece as it arrives, called from the
        connection's own callback (no task wakes up per piece), until `on_data` returns True
        or the body ends; raise if the connection breaks first. `on_data` must not raise.
        What follows its True is left for `read`."""
        connection = self._connection
        if connection.body and on_data(connection.take()):
            return
        connection.listener = on_data
        try:
            while connection.listener is not None and not connection.complete:
                if connection.closed:
                    raise self._ended_early()
                await connection.wait(None, self._request)
        finally:
            connection.listener = None

    def _ended_early(self) -> httpx2.RemoteProtocolError:
        return httpx2.RemoteProtocolError(
            f"the response ended early: {self._connection.error}", request=self._request
        )

    async def aclose(self) -> None:
        self._transport.release(self._connection)


class Http11Transport(httpx2.AsyncBaseTransport):
    """Requests over reused HTTP/1.1 connections, `max_idle` of them kept open when idle."""

    def __init__(
        self, ssl_context: ssl.SSLContext | None = None, max_idle: int = 100, spare: int = 0
    ) -> None:
        self._ssl_context = ssl_context
        self._max_idle = max_idle
        self._spare = spare
        self._idle: dict[Origin, list[_Connection]] = {}
        self._idle_count = 0
        # Connections being opened ahead of need, per origin (at most `spare` at a time).
        self._opening: dict[Origin, set[asyncio.Task[None]]] = {}
        self._closed = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in DEFAULT_PORTS:
            raise httpx2.UnsupportedProtocol(f"cannot send {scheme}:// requests", request=request)
        origin = (scheme, url.host, url.port or DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout", {})
        read_timeout: float | None = timeouts.get("read")
        connection = self._idle_connection(origin)
        if self._spare:
            self._keep_spare(origin, timeouts.get("connect"), request)
        if connection is None:
            connection = await self._connect(origin, timeouts.get("connect"), request)
        content = await request.aread()
        connection.send(_head(request, content) + content)
        try:
            while not connection.headers_complete:
                if connection.closed:
                    raise httpx2.RemoteProtocolError(
                        f"no response: {connection.error}", request=request
                    )
                await connection.wait(read_timeout, request)
        except BaseException:
            self.release(connection)
            raise
        body = _Body(self, connection, request, read_timeout)
        return httpx2.Response(
            connection.parser.get_status_code(),
            headers=connection.headers,
            stream=body,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": connection.reason,
                BODY_EXTENSION: body,
            },
        )

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.reusable():
                return connection
            connection.fail("closed while idle")
        return None

    def _keep_spare(self, origin: Origin, seconds: float | None, request: httpx2.Request) -> None:
        """Open connections in the background until `spare` are idle or on their way."""
        opening = self._opening.setdefault(origin, set())
        missing = self._spare - len(self._idle.get(origin, ())) - len(opening)
        for _ in range(max(0, missing)):
            task = asyncio.create_task(self._open_spare(origin, seconds, request))
            opening.add(task)
            task.add_done_callback(opening.discard)

    async def _open_spare(
        self, origin: Origin, seconds: float | None, request: httpx2.Request
    ) -> None:
        try:
            connection = await self._connect(origin, seconds, request)
        except httpx2.TransportError:
            return  # the next request connects itself, and fails with the reason
        self._park(connection, behind=True)  # behind the warmer ones

    async def _connect(
        self, origin: Origin, seconds: float | None, request: httpx2.Request
    ) -> _Connection:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx2.create_ssl_context()
            tls = self._ssl_context
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin), host, port, ssl=tls
                )
        except TimeoutError:
            raise httpx2.ConnectTimeout(
                f"timed out connecting to {host}:{port}", request=request
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx2.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        return connection

    def release(self, connection: _Connection) -> None:
        """A response is done with: its connection goes back to the idle list if the response
        was read to its end and the server keeps it alive, else it is closed."""
        if not connection.busy:
            return
        connection.busy = False
        reusable = (
            connection.complete
            and not connection.closed
            and not connection.until_close
            and connection.keep_alive
        )
        if reusable:
            self._park(connection)
        else:
            connection.fail("closed by the client")

    def _park(self, connection: _Connection, *, behind: bool = False) -> None:
        """Into the idle list (taken from its end), unless the transport is closed (a body
        read to its end after aclose(): llm._finish_reading) or the list is full."""
        if self._closed or self._idle_count >= self._max_idle:
            connection.fail("closed by the client")
            return
        idle = self._idle.setdefault(connection.origin, [])
        if behind:
            idle.insert(0, connection)
        else:
            idle.append(connection)
        self._idle_count += 1

    async def aclose(self) -> None:
        self._closed = True
        opening = [task for tasks in self._opening.values() for task in tasks]
        for task in opening:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        for idle in self._idle.values():
            for connection in idle:
                connection.fail("closed by the client")
        self._idle.clear()
        self._idle_count = 0


def _head(request: httpx2.Request, body: bytes) -> bytes:
    """The request line and headers. The body is sent whole, so it always has a length."""
    lines = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.url.raw_path)]
    has_length = False
    for name, value in request.headers.raw:
        lower = name.lower()
        if lower == b"transfer-encoding":
            continue
        has_length = has_length or lower == b"content-length"
        lines.append(b"%s: %s\r\n" % (name, value))
    if not has_length and (body or request.method not in ("GET", "HEAD")):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines)


def _plain_body(response: httpx2.Response) -> _Body | None:
    """The body stream of a response from this transport, unless it is content-encoded: only
    then can its bytes be taken straight from the connection."""
    body = response.extensions.get(BODY_EXTENSION)
    if isinstance(body, _Body) and "content-encoding" not in response.headers:
        return body
    return None


def body_follower(
    response: httpx2.Response,
) -> Callable[[Callable[[bytes], bool]], Awaitable[None]] | None:
    """`_Body.follow` for a body from this transport that is not content-encoded; None for
    any other (read those with `raw_reader`)."""
    body = _plain_body(response)
    return body.follow if body is not None else None


def raw_reader(response: httpx2.Response) -> Callable[[], Awaitable[bytes]]:
    """A function reading the response body a piece at a time, b"" at its end.

    A body from this transport, not content-encoded, is read straight from its connection,
    without a timer per read: the caller keeps its own clock (llm.py's watchdog). Any other
    body goes through httpx2's iterator, decoding included.
    """
    body = _plain_body(response)
    if body is not None:
        return functools.partial(body.read, None)
    pieces = response.aiter_bytes().__aiter__()

    async def read() -> bytes:
        try:
            return await pieces.__anext__()
        except StopAsyncIteration:
            return b""

    return read
