"""Shared fixtures: a real PostgreSQL, the fake OpenAI upstream, and real gateway servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from litestar import Litestar

from bench.fake_upstream import FakeUpstream
from qna_gateway.app import create_app
from qna_gateway.lifecycle import Lifecycle
from qna_gateway.settings import Secret, Settings, normalise_database_url
from qna_gateway.store.embedded import EmbeddedPostgres
from qna_gateway.store.migrations import apply_migrations
from qna_gateway.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
KB_DIR = ROOT / "kb"


# -- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A server to create the test database on: DATABASE_URL's, or an embedded one.

    The embedded server's folder is not under pytest's tmp_path: pytest prunes old base
    folders when another run starts, which would pull the data out from under this one.
    """
    url = os.environ.get("DATABASE_URL")
    if url:
        yield normalise_database_url(url)
        return
    folder = Path(tempfile.mkdtemp(prefix="qna-test-pg-"))
    server = EmbeddedPostgres(folder)
    uri = asyncio.run(server.start())
    try:
        yield uri
    finally:
        asyncio.run(server.stop())
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(postgres_server: str) -> Iterator[str]:
    """A fresh database for this run (dropped at the end), migrated."""
    name = f"qna_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(postgres_server)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo("", **{k: v for k, v in info.items() if v is not None})
    asyncio.run(apply_migrations(url))
    try:
        yield url
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A connection to the test database, for checking what was stored."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        yield conn


# -- the fake LLM ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


# -- the gateway, in this process --------------------------------------------------------------


def base_settings(url: str, **overrides: Any) -> Settings:
    """Test settings on the database at `url`; `overrides` replace any field (even the URL)."""
    settings = Settings(
        database_url=Secret(url),
        kb_dir=KB_DIR,
        batch_interval_ms=20,
        sse_ping_seconds=15,
        sse_retry_ms=500,
        drain_seconds=5,
        orphan_seconds=30,
        db_pool_min=1,
        db_pool_max=10,
        llm_max_retries=0,
    )
    return replace(settings, **overrides)


class _QuietServer(uvicorn.Server):
    """A server for tests: leaves the process's signal handlers to pytest."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Gateway:
    """A gateway served over real HTTP on a free loopback port."""

    app: Litestar
    lifecycle: Lifecycle
    base_url: str
    client: httpx.AsyncClient
    settings: Settings
    server: uvicorn.Server = field(repr=False)

    async def create_chat(self, **body: Any) -> str:
        response = await self.client.post("/v1/chats", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings, telemetry: Telemetry | None = None
) -> AsyncIterator[Gateway]:
    lifecycle = Lifecycle()
    app = create_app(settings, lifecycle=lifecycle, telemetry=telemetry)
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway did not start")
        await asyncio.sleep(0.01)
    async with asyncio.timeout(60):  # the services come up after the server starts
        while lifecycle.services is None:
            await asyncio.sleep(0.01)
    base_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        try:
            yield Gateway(app, lifecycle, base_url, client, settings, server)
        finally:
            # Drain first (as a SIGTERM would), so no stream is left for uvicorn to wait on.
            await lifecycle.drain()
            server.should_exit = True
            await task
            sock.close()


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def gateway_factory(database_url: str) -> AsyncIterator[GatewayFactory]:
    """Start gateways with settings overrides; all are stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(telemetry: Telemetry | None = None, **overrides: Any) -> Gateway:
            return await stack.enter_async_context(
                running_gateway(base_settings(database_url, **overrides), telemetry)
            )

        yield start


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> Gateway:
    """A gateway in extractive mode (no LLM)."""
    return await gateway_factory()


@pytest.fixture
async def llm_gateway(gateway_factory: GatewayFactory, upstream: FakeUpstream) -> Gateway:
    """A gateway answering from the fake OpenAI-compatible upstream."""
    return await gateway_factory(openai_base_url=upstream.base_url, model="fake-model")


# -- the gateway as a real `qna-gateway serve` process -----------------------------------------


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("qna-gateway")
    if script.exists():
        return [str(script)]
    found = shutil.which("qna-gateway")
    if found is None:
        raise RuntimeError("the qna-gateway console script is not installed")
    return [found]


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_serve(env: dict[str, str], log_path: Path, *, timeout: float = 30) -> ServeProcess:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("QNA_", "OPENAI_"))}
    full_env.update({"QNA_PORT": str(port), "QNA_LOG_FORMAT": "json"}, **env)
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [*gateway_command(), "serve"],
        env=full_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    log_file.close()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited early:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/ready", timeout=1).status_code == 200:
                return ServeProcess(process, base_url, log_path)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"serve did not become ready:\n{log_path.read_text()}")


@pytest.fixture
def serve_factory(database_url: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `qna-gateway serve` processes on the test database; killed after the test."""
    started: list[ServeProcess] = []

    def start(**env: str) -> ServeProcess:
        merged = {"DATABASE_URL": database_url, "QNA_KB_DIR": str(KB_DIR), **env}
        proc = start_serve(merged, tmp_path / f"serve-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
        proc.process.wait(timeout=10)
