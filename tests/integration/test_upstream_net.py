"""The asyncio network backend under the LLM client, against real sockets: plain and TLS,
keep-alive reuse, a server that closes an idle connection, timeouts, a refused port."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx2
import pytest
import trustme

from qna_gateway.upstream_net import use_asyncio_backend


@dataclass
class Server:
    """HTTP/1.1 on 127.0.0.1: each request gets a chunked body of `pieces`, one write each."""

    pieces: list[bytes]
    delay: float = 0.0
    close_after_response: bool = False
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                for piece in self.pieces:
                    await asyncio.sleep(self.delay)
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
                if self.close_after_response:
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


def client(*, verify: ssl.SSLContext | bool = True, read: float = 5) -> httpx2.AsyncClient:
    transport = httpx2.AsyncHTTPTransport(verify=verify)
    assert use_asyncio_backend(transport)
    return httpx2.AsyncClient(transport=transport, timeout=httpx2.Timeout(5, read=read))


async def body_reads(response: httpx2.Response) -> list[bytes]:
    return [chunk async for chunk in response.aiter_raw()]


PIECES = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]


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
