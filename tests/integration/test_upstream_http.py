"""The HTTP/1.1 transport under the LLM client, against real sockets: plain and TLS,
keep-alive reuse, a server that closes an idle connection, timeouts, a refused port, bodies
cut short or ended by the close."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trustme

from qna_gateway.upstream_http import Http11Transport, body_follower, raw_reader


@dataclass
class Server:
    """HTTP/1.1 on 127.0.0.1: each request gets a body of `pieces`, one write each, framed
    with chunks, a Content-Length, or the connection's close; `cut` closes it mid-body."""

    pieces: list[bytes]
    delay: float = 0.0
    framing: str = "chunked"
    close_after_response: bool = False
    cut: bool = False
    extra_headers: bytes = b""
    connections: int = 0
    ended: int = 0  # connections the client closed
    requests: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.ended += 1
                    raise
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                self.requests.append(head + await reader.readexactly(length))
                framing = {
                    "chunked": b"transfer-encoding: chunked\r\n",
                    "length": b"content-length: %d\r\n" % len(b"".join(self.pieces)),
                    "close": b"",
                }[self.framing]
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n%s%s\r\n"
                    % (framing, self.extra_headers)
                )
                for piece in self.pieces:
                    await asyncio.sleep(self.delay)
                    chunked = self.framing == "chunked"
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    await writer.drain()
                    if self.cut:
                        writer.close()
                        return
                if self.framing == "chunked":
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                if self.close_after_response or self.framing == "close":
                    writer.close()
                    return


@contextlib.asynccontextmanager
async def serving(server: Server, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for writer in server.writers:
            writer.close()
        listener.close()
        await listener.wait_closed()


def client(
    *, verify: ssl.SSLContext | None = None, read: float = 5, spare: int = 0
) -> httpx2.AsyncClient:
    transport = Http11Transport(ssl_context=verify, spare=spare)
    return httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(5, read=read))


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.005)


async def body_reads(response: httpx2.Response) -> list[bytes]:
    return [chunk async for chunk in response.aiter_raw()]


PIECES = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


def gzip_server() -> Server:
    """PIECES gzipped, in one piece, with its Content-Encoding."""
    return Server([gzip.compress(b"".join(PIECES))], extra_headers=b"content-encoding: gzip\r\n")


async def test_streams_each_piece_and_reuses_the_connection() -> None:
    server = Server(PIECES, delay=0.01)
    async with serving(server) as port, client() as http:
        for _ in range(3):
            async with http.stream("GET", f"http://127.0.0.1:{port}/") as response:
                assert response.status_code == 200
                reads = await body_reads(response)
            assert b"".join(reads) == b"".join(PIECES)
            assert len(reads) == len(PIECES)  # paced pieces arrive as they were sent
    assert server.connections == 1


async def test_tls_with_a_verified_certificate() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    server = Server(PIECES)
    async with serving(server, tls=server_context) as port:
        async with client(verify=client_context) as http:
            for _ in range(2):
                response = await http.get(f"https://localhost:{port}/")
                assert response.content == b"".join(PIECES)
        assert server.connections == 1
        # A certificate nobody vouches for is refused.
        async with client(verify=ssl.create_default_context()) as http:
            with pytest.raises(httpx2.ConnectError):
                await http.get(f"https://localhost:{port}/")


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    server = Server(PIECES, close_after_response=True)
    async with serving(server) as port, client() as http:
        for _ in range(3):
            response = await http.get(f"http://127.0.0.1:{port}/")
            assert response.content == b"".join(PIECES)
            await asyncio.sleep(0.05)  # idle for a moment: the server's close arrives
    assert server.connections == 3


async def test_a_silent_server_is_a_read_timeout() -> None:
    server = Server(PIECES, delay=2)
    async with serving(server) as port, client(read=0.2) as http:
        with pytest.raises(httpx2.ReadTimeout):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_a_refused_port_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        async with client() as http:
            with pytest.raises(httpx2.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/")


async def test_a_spare_connection_is_kept_ready_for_the_next_request() -> None:
    server = Server(PIECES, delay=0.05)
    async with serving(server) as port, client(spare=1) as http:
        url = f"http://127.0.0.1:{port}/"
        async with http.stream("GET", url) as first:
            # The first request connected for itself, and opened a spare meanwhile.
            await until(lambda: server.connections == 2)
            assert len(server.requests) == 1
            async with http.stream("GET", url) as second:  # on the spare, while first runs
                await until(lambda: len(server.requests) == 2)
                assert b"".join(await body_reads(second)) == b"".join(PIECES)
            assert b"".join(await body_reads(first)) == b"".join(PIECES)
        # The second took the spare, so a new one was opened; nothing more.
        await until(lambda: server.connections == 3)
        for _ in range(3):  # one after another: the idle connections serve them
            assert (await http.get(url)).content == b"".join(PIECES)
        await asyncio.sleep(0.05)
        assert server.connections == 3


async def test_a_spare_that_cannot_connect_leaves_the_error_to_the_request() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        async with client(spare=1) as http:
            for _ in range(2):
                with pytest.raises(httpx2.ConnectError):
                    await http.get(f"http://127.0.0.1:{port}/")


async def test_closing_the_transport_closes_its_spare() -> None:
    server = Server(PIECES)
    async with serving(server) as port:
        async with client(spare=1) as http:
            assert (await http.get(f"http://127.0.0.1:{port}/")).content == b"".join(PIECES)
            await until(lambda: server.connections == 2)
        await until(lambda: server.ended == 2)  # the used one and the spare


async def test_a_body_larger_than_the_buffer_limit_arrives_whole() -> None:
    big = [bytes([65 + i % 26]) * 100_000 for i in range(8)]  # 800 KB, past the high water
    server = Server(big)
    async with (
        serving(server) as port,
        client() as http,
        http.stream("GET", f"http://127.0.0.1:{port}/") as response,
    ):
        await asyncio.sleep(0.3)  # let the server fill the buffer while nothing reads
        data = b"".join([chunk async for chunk in response.aiter_raw()])
    assert data == b"".join(big)


@pytest.mark.parametrize("framing", ["length", "close"])
async def test_bodies_with_a_length_or_ended_by_the_close(framing: str) -> None:
    server = Server(PIECES, delay=0.01, framing=framing)
    async with serving(server) as port, client() as http:
        for _ in range(2):
            response = await http.get(f"http://127.0.0.1:{port}/")
            assert response.content == b"".join(PIECES)
    # A length lets the connection be reused; a body ended by the close cannot.
    assert server.connections == (1 if framing == "length" else 2)


async def test_a_body_cut_short_is_a_protocol_error() -> None:
    server = Server(PIECES, cut=True)
    async with serving(server) as port, client() as http:
        with pytest.raises(httpx2.RemoteProtocolError, match="ended early"):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_the_request_goes_out_with_its_body_and_length() -> None:
    server = Server(PIECES)
    async with serving(server) as port, client() as http:
        await http.post(f"http://127.0.0.1:{port}/v1/chat?x=1", json={"q": "é"})
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat?x=1 HTTP/1.1\r\n")
    assert b"\r\nContent-Length: %d" % len(body) in head.title()
    assert body == '{"q":"é"}'.encode()


async def test_a_response_closed_before_its_end_does_not_reuse_the_connection() -> None:
    server = Server(PIECES, delay=0.05)
    async with serving(server) as port, client() as http:
        for _ in range(2):
            async with http.stream("GET", f"http://127.0.0.1:{port}/") as response:
                async for _ in response.aiter_raw():
                    break  # the rest of the body is still on its way
        response = await http.get(f"http://127.0.0.1:{port}/")
        assert response.content == b"".join(PIECES)
    assert server.connections == 3


async def _until_empty(read: Callable[[], Awaitable[bytes]]) -> AsyncIterator[bytes]:
    while piece := await read():
        yield piece


async def test_a_response_released_after_the_transport_closed_closes_its_connection() -> None:
    # The answerer reads what follows [DONE] in the background (llm._finish_reading): at
    # shutdown that can end after the client is closed, and its connection must not be kept.
    server = Server(PIECES, delay=0.05)
    async with serving(server) as port:
        http = client()
        request = http.build_request("GET", f"http://127.0.0.1:{port}/")
        response = await http.send(request, stream=True)
        read = raw_reader(response)
        assert await read() == PIECES[0]
        await http.aclose()  # the rest of the body is still on its way
        rest = [piece async for piece in _until_empty(read)]
        assert b"".join(rest) == b"".join(PIECES[1:])
        await response.aclose()
        await until(lambda: server.ended != 0)
    assert server.connections == 1


async def test_the_raw_reader_reads_past_httpx_and_releases_the_connection() -> None:
    server = Server(PIECES, delay=0.01)
    async with serving(server) as port, client() as http:
        for _ in range(2):
            async with http.stream("GET", f"http://127.0.0.1:{port}/") as response:
                read = raw_reader(response)
                reads = []
                while data := await read():
                    reads.append(data)
            assert reads == PIECES
    assert server.connections == 1


async def test_the_raw_reader_decodes_a_compressed_body() -> None:
    server = gzip_server()
    async with (
        serving(server) as port,
        client() as http,
        http.stream("GET", f"http://127.0.0.1:{port}/") as response,
    ):
        read = raw_reader(response)
        data = b""
        while piece := await read():
            data += piece
    assert data == b"".join(PIECES)


async def test_follow_hands_each_piece_over_as_it_arrives_and_leaves_the_rest_to_read() -> None:
    server = Server([b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n", b"after"], delay=0.02)
    async with serving(server) as port, client() as http:
        for _ in range(2):
            async with http.stream("GET", f"http://127.0.0.1:{port}/") as response:
                follow = body_follower(response)
                assert follow is not None
                seen: list[tuple[bytes, asyncio.Task[object] | None]] = []

                def on_data(data: bytes, seen: list[Any] = seen) -> bool:
                    seen.append((data, asyncio.current_task()))
                    return b"[DONE]" in data

                await follow(on_data)
                # Delivered from the connection's callback, not from a task.
                assert [data for data, _ in seen] == server.pieces[:3]
                assert all(task is None for _, task in seen)
                read = raw_reader(response)
                rest = b""
                while piece := await read():
                    rest += piece
                assert rest == b"after"
    assert server.connections == 1  # read to its end, the connection was reused


async def test_follow_returns_at_the_end_of_a_body_and_raises_when_it_is_cut() -> None:
    pieces: list[bytes] = []

    def keep(data: bytes) -> bool:
        pieces.append(data)
        return False  # never done: the body's end ends it

    async with (
        serving(Server(PIECES, delay=0.01)) as port,
        client() as http,
        http.stream("GET", f"http://127.0.0.1:{port}/") as response,
    ):
        follow = body_follower(response)
        assert follow is not None
        await follow(keep)
    assert b"".join(pieces) == b"".join(PIECES)
    async with (
        serving(Server(PIECES, delay=0.01, cut=True)) as port,
        client() as http,
        http.stream("GET", f"http://127.0.0.1:{port}/") as response,
    ):
        follow = body_follower(response)
        assert follow is not None
        with pytest.raises(httpx2.RemoteProtocolError):
            await follow(keep)


async def test_no_follower_for_an_encoded_body() -> None:
    server = gzip_server()
    async with (
        serving(server) as port,
        client() as http,
        http.stream("GET", f"http://127.0.0.1:{port}/") as response,
    ):
        assert body_follower(response) is None


async def test_the_default_tls_context_trusts_ssl_cert_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    server = Server(PIECES)
    async with serving(server, tls=server_context) as port:
        # By default (certifi's roots) a private CA's certificate is refused…
        async with client() as http:
            with pytest.raises(httpx2.ConnectError):
                await http.get(f"https://localhost:{port}/")
        # …and trusted once SSL_CERT_FILE names that CA, as for the rest of httpx2.
        bundle = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(bundle))
        monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
        async with client() as http:
            response = await http.get(f"https://localhost:{port}/")
            assert response.content == b"".join(PIECES)
