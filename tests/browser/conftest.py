"""Browser fixtures: Debian's Chromium through playwright, and an HTTP proxy the tests control.

Chromium comes from the system (`apt-get install chromium`, which `.ci/run` does when it is
missing), never from `playwright install`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, ConsoleMessage, Dialog, Page, async_playwright, expect

from tests.conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = ROOT / "test-output" / "browser"
TIMEOUT_MS = 20_000

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium "
            "(.ci/run does this when it is missing)"
        )
    return CHROMIUM


@pytest.fixture(scope="session")
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), headless=True, args=LAUNCH_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class PageProblems:
    """What must not happen on the page: uncaught errors, CSP violations, JS dialogs."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@pytest.fixture
def problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
async def page(
    browser: Browser, problems: PageProblems, request: pytest.FixtureRequest
) -> AsyncIterator[Page]:
    """A fresh browser context (its own session storage) and page; a screenshot of how the
    page looked at the end goes to test-output/browser/<test>.png."""
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text or message.type == "warning":
            problems.errors.append(f"console {message.type}: {message.text}")

    async def on_dialog(dialog: Dialog) -> None:
        problems.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    page.on("pageerror", lambda error: problems.errors.append(f"page error: {error}"))
    page.on("console", on_console)
    page.on("dialog", on_dialog)
    try:
        yield page
    finally:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        with contextlib.suppress(Exception):  # a page that is gone has nothing to show
            await page.screenshot(path=OUTPUT / f"{name}.png", full_page=True)
        await context.close()
    assert problems.errors == []
    assert problems.dialogs == []


# -- a proxy in front of a gateway -------------------------------------------------------------


@dataclass(frozen=True)
class SeenRequest:
    """A request as the proxy received it (before any prefix was stripped)."""

    method: str
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    streams: bool = False  # carried a request for an answer's SSE stream

    def abort(self) -> None:
        self.client.transport.abort()
        self.server.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


class HttpProxy:
    """A loopback HTTP/1.1 proxy in front of a gateway, on this test's event loop.

    It records every request as sent on the wire, can strip a path prefix the way an ingress
    does for `QNA_ROOT_PATH` (answering 404 outside it), and can drop the connections that
    carry SSE streams, as a failing load balancer or a network blip does.
    """

    def __init__(self, target_base_url: str, *, strip_prefix: str = "") -> None:
        target = urlsplit(target_base_url)
        self._host = target.hostname or "127.0.0.1"
        self._port = target.port or 80
        self.prefix = strip_prefix.rstrip("/")
        self.requests: list[SeenRequest] = []
        self.base_url = ""
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> HttpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def stream_requests(self) -> list[SeenRequest]:
        return [r for r in self.requests if r.path.endswith("/stream")]

    def cut_streams(self) -> int:
        """Drop every connection that carried an SSE stream request; how many were dropped."""
        cut = [link for link in self._links if link.streams]
        for link in cut:
            link.abort()
        return len(cut)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()  # the connection tasks then end by themselves
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=5)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _rewrite(self, target: str) -> str | None:
        """The target to forward, or None when it is outside the prefix."""
        if not self.prefix:
            return target
        path = urlsplit(target).path
        if path == self.prefix or path.startswith(self.prefix + "/"):
            rest = target[len(self.prefix) :]
            return rest if rest.startswith("/") else "/" + rest
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels, and only a stuck connection; asyncio's streams would log a
            # cancelled connection task as an error.
            pass
        finally:
            await _close(writer)
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        forward = asyncio.create_task(self._forward_requests(reader, link))
        backward = asyncio.create_task(_pipe(up_reader, writer))
        try:
            await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forward.cancel()
            backward.cancel()
            await asyncio.gather(forward, backward, return_exceptions=True)
            self._links.discard(link)
            await _close(up_writer)

    async def _forward_requests(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            request_line, _, rest = head.partition(b"\r\n")
            method, target, version = request_line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            for line in rest.decode("latin-1").split("\r\n"):
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            self.requests.append(SeenRequest(method, target, headers))
            assert "chunked" not in headers.get("transfer-encoding", ""), "not supported here"
            length = int(headers.get("content-length") or 0)
            try:
                body = await reader.readexactly(length) if length else b""
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            forwarded = self._rewrite(target)
            if forwarded is None:  # outside the prefix: the ingress has no route for it
                link.client.write(
                    b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\n"
                    b"content-length: 21\r\n\r\nno route at the proxy"
                )
                await link.client.drain()
                continue
            if urlsplit(forwarded).path.endswith("/stream"):
                link.streams = True
            start_line = f"{method} {forwarded} {version}\r\n".encode("latin-1")
            link.server.write(start_line + rest + body)
            await link.server.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


ProxyFactory = Callable[..., Awaitable[HttpProxy]]


@pytest.fixture
async def proxy_factory() -> AsyncIterator[ProxyFactory]:
    """`await proxy_factory(base_url, strip_prefix="/qna")`: a started proxy, closed after the
    test."""
    started: list[HttpProxy] = []

    async def start(target_base_url: str, *, strip_prefix: str = "") -> HttpProxy:
        proxy = HttpProxy(target_base_url, strip_prefix=strip_prefix)
        started.append(proxy)
        return await proxy.start()

    yield start
    for proxy in started:
        await proxy.close()
