"""PostgreSQL down at start, lost mid-answer, pool exhausted: each with its documented outcome."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from bench.fake_upstream import FakeUpstream, Scenario, answer_text
from qna_gateway.settings import Secret
from tests.conftest import (
    GatewayFactory,
    base_settings,
    free_port,
    gateway_command,
    running_gateway,
)
from tests.fixtures.db_proxy import DatabaseProxy
from tests.fixtures.metrics import sample_value
from tests.sse import deltas_text, stream_events


@pytest.fixture
def proxy(database_url: str) -> Iterator[DatabaseProxy]:
    proxy = DatabaseProxy(database_url)
    yield proxy
    proxy.close()


async def test_database_down_at_start_then_up(proxy: DatabaseProxy, tmp_path: Path) -> None:
    """The process serves at once: /health 200, /ready 503 naming the problem, asks 503; when
    the database appears it becomes ready by itself. (Started by hand: the serve fixtures wait
    for /ready, which must not come yet.)"""
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QNA_", "OPENAI_"))}
    env.update({"DATABASE_URL": proxy.url, "QNA_PORT": str(port), "QNA_LOG_FORMAT": "json"})
    with log_path.open("wb") as log_file:
        process = await asyncio.to_thread(
            subprocess.Popen,
            [*gateway_command(), "serve"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            async with asyncio.timeout(20):
                while True:
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
            ready = await client.get("/ready")
            assert ready.status_code == 503
            assert "startup" in ready.json()["checks"]
            refused = await client.post("/v1/chats", json={})
            assert refused.status_code == 503
            assert refused.headers["retry-after"]

            proxy.up()
            async with asyncio.timeout(30):
                while (await client.get("/ready")).status_code != 200:
                    await asyncio.sleep(0.1)
            assert (await client.post("/v1/chats", json={})).status_code == 201
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "start-up failed" in log_path.read_text()


async def test_database_lost_mid_answer_keeps_the_text(
    proxy: DatabaseProxy,
    gateway_factory: GatewayFactory,
    upstream: FakeUpstream,
    database_url: str,
) -> None:
    proxy.up()
    gw = await gateway_factory(
        database_url=Secret(proxy.url),
        openai_base_url=upstream.base_url,
        model="fake-model",
        db_pool_timeout_seconds=0.5,
    )
    scenario = {"tokens": 60, "tokens_per_second": 40}
    upstream.set_scenario(**scenario)
    chat_id = await gw.create_chat()
    stream = asyncio.create_task(
        stream_events(gw.client, "POST", f"/v1/chats/{chat_id}/messages", json={"content": "Go"})
    )
    async with asyncio.timeout(10):
        while upstream.stats()["chunks"] < 10:
            await asyncio.sleep(0.02)
    proxy.down()  # every connection cut; batches now fail and stay in memory
    await asyncio.sleep(0.5)
    proxy.up()
    events = await asyncio.wait_for(stream, 30)
    final = events[-1].data
    assert events[-1].event == "message.completed"
    assert deltas_text(events) == answer_text(Scenario(**scenario))  # type: ignore[arg-type]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT status, content FROM messages WHERE id = %s", (final["id"],)
        )
        row = await cur.fetchone()
    assert row == ("completed", answer_text(Scenario(**scenario)))  # type: ignore[arg-type]


async def test_pool_exhausted_is_a_clear_503(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory(db_pool_min=1, db_pool_max=1, db_pool_timeout_seconds=0.3)
    services = gw.lifecycle.services
    assert services is not None
    async with services.pool.connection():  # the only connection, held
        response = await gw.client.post("/v1/chats", json={})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"]
    assert "busy" in response.json()["detail"]
    assert (await gw.client.post("/v1/chats", json={})).status_code == 201


# A socket option and where it lives, by the name libpq's parameter sets it under.
_KEEPALIVE_OPTIONS = {
    "keepalives": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "keepalives_idle": (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    "keepalives_interval": (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    "keepalives_count": (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    "tcp_user_timeout": (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
}


def _keepalives_of_sockets_to(port: int) -> list[dict[str, int]]:
    """The keepalive options of every socket of this process connected to 127.0.0.1:`port`,
    read from the kernel (so what libpq actually set, not what it was asked)."""
    found = []
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if not os.readlink(entry).startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(entry.name)))
        except OSError:
            continue  # gone meanwhile, or not a socket Python can wrap
        with sock:
            try:
                peer = sock.getpeername()
            except OSError:
                continue
            if peer == ("127.0.0.1", port):
                found.append(
                    {name: sock.getsockopt(*where) for name, where in _KEEPALIVE_OPTIONS.items()}
                )
    return found


async def test_database_connections_probe_a_silent_server(
    proxy: DatabaseProxy, database_url: str, gateway_factory: GatewayFactory
) -> None:
    """A server that vanished without a word (a failover, a dropped NAT entry) is found out in
    about a minute on every connection, the pool's and the event listener's: libpq's default
    leaves keepalive timing to the kernel, two hours. A DATABASE_URL's own values win."""
    proxy.up()
    await gateway_factory(database_url=Secret(proxy.url), db_pool_min=2)
    sockets = _keepalives_of_sockets_to(proxy.port)
    assert len(sockets) >= 3, sockets  # the pool's two and the listener
    expected = {
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 60000,
    }
    assert all(options == expected for options in sockets), sockets

    own = DatabaseProxy(database_url)
    own.up()
    url = Secret(f"{own.url} keepalives_idle=7 tcp_user_timeout=0")
    try:
        async with running_gateway(base_settings(database_url, database_url=url, db_pool_min=2)):
            sockets = _keepalives_of_sockets_to(own.port)
    finally:
        own.close()
    assert len(sockets) >= 3, sockets
    expected |= {"keepalives_idle": 7, "tcp_user_timeout": 0}
    assert all(options == expected for options in sockets), sockets


async def test_metrics_say_when_the_event_listener_is_away(
    proxy: DatabaseProxy, gateway_factory: GatewayFactory
) -> None:
    """`db_event_listener_up` is 1 while the LISTEN connection is up, 0 while the database is
    unreachable (this replica then misses other replicas' cancels), and 1 again once the
    listener has reconnected by itself."""
    proxy.up()
    gw = await gateway_factory(database_url=Secret(proxy.url))

    async def listener_up() -> float:
        found = sample_value((await gw.client.get("/metrics")).text, "db_event_listener_up")
        assert found is not None, "no db_event_listener_up in /metrics"
        return found

    async def until(wanted: float) -> None:
        async with asyncio.timeout(20):
            while await listener_up() != wanted:
                await asyncio.sleep(0.05)

    assert await listener_up() == 1
    proxy.down()
    await until(0)
    proxy.up()
    await until(1)
