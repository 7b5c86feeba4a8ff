"""Start-up order, and the drain that SIGTERM starts: the gateway owns it, not uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import FrameType

import uvicorn

from .answers import Answerer
from .kb import KnowledgeBase
from .llm import make_answerer
from .settings import Settings
from .store.embedded import EmbeddedPostgres
from .store.migrations import apply_migrations
from .store.pool import Pool, make_pool, with_keepalives
from .store.tracing import traced_cursor_class
from .telemetry import Telemetry
from .turn_manager import TurnManager

log = logging.getLogger(__name__)

ABORT_WRITE_SECONDS = 3.0

# Middle-generation collections before a full one may run (CPython's default is 10); see
# settle_heap.
FULL_COLLECTION_AFTER = 100


@dataclass(slots=True)
class Services:
    """What the handlers work with, built by `running_services`."""

    settings: Settings
    pool: Pool
    kb: KnowledgeBase
    answerer: Answerer
    manager: TurnManager
    telemetry: Telemetry


async def resolve_database(
    settings: Settings, embedded: EmbeddedPostgres | None
) -> tuple[str, EmbeddedPostgres | None]:
    """The conninfo to use: DATABASE_URL, or a freshly started embedded server; either way
    with TCP keepalives that find a silently dead connection in about a minute."""
    if settings.database_url is not None:
        return with_keepalives(settings.database_url.reveal()), None
    server = embedded or EmbeddedPostgres(settings.data_dir)
    log.info("DATABASE_URL is not set: starting an embedded PostgreSQL in %s", server.data_dir)
    return with_keepalives(await server.start()), server


@contextlib.asynccontextmanager
async def running_services(
    settings: Settings, telemetry: Telemetry, *, answerer: Answerer | None = None
) -> AsyncIterator[Services]:
    """Everything in start-up order; torn down in reverse, after the drain."""
    conninfo, embedded = await resolve_database(settings, None)
    try:
        applied = await apply_migrations(conninfo)
        if applied:
            log.info("database schema migrated to version %d", applied[-1])
        pool = make_pool(
            conninfo,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_pool_timeout_seconds,
            cursor_factory=traced_cursor_class(telemetry.tracer) if telemetry.tracing else None,
        )
        telemetry.metrics.watch_pool(pool.get_stats)
        await pool.open(wait=True, timeout=max(settings.db_pool_timeout_seconds, 10))
        try:
            kb = KnowledgeBase(pool, on_search=telemetry.metrics.kb_searches.inc)
            await kb.sync(settings.kb_dir)
            answerer = answerer or make_answerer(settings, kb, telemetry)
            if settings.llm_configured:
                log.info(
                    "LLM: model %s at %s", settings.model, settings.openai_base_url or "OpenAI"
                )
            else:
                log.warning(
                    "no LLM is configured (set OPENAI_API_KEY or OPENAI_BASE_URL): "
                    "answering in extractive mode from the knowledge base in %s",
                    settings.kb_dir,
                )
            manager = TurnManager(
                settings=settings,
                pool=pool,
                answerer=answerer,
                conninfo=conninfo,
                telemetry=telemetry,
            )
            await manager.start()
            telemetry.metrics.watch_event_listener(lambda: manager.hub.connected)
            try:
                yield Services(
                    settings=settings,
                    pool=pool,
                    kb=kb,
                    answerer=answerer,
                    manager=manager,
                    telemetry=telemetry,
                )
            finally:
                if not manager.draining.is_set():
                    await manager.drain(settings.drain_seconds)
                await manager.stop()
                await answerer.aclose()
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await embedded.stop()


def settle_heap() -> None:
    """After start-up: move what it made out of the cyclic collector's sight.

    Start-up leaves a few hundred thousand long-lived objects (modules, the app, pools,
    schemas), and every older-generation collection walked them again: the collector was a
    tenth of the gateway's CPU while relaying tokens (perf, 100 paced streams). Frozen
    objects are never collected, so this runs once, when the services are up, and freezes
    only what lives as long as the process. (A larger young generation measured no better.)

    Then the full collections: by default one may run after every 10 middle-generation ones,
    and streams make that often, since each open stream's tasks and coroutines live long
    enough to reach the oldest generation. Each then walks every open stream's objects (some
    230 a stream) with the loop stopped: 20-110 ms at 500 paced streams, every few seconds,
    which was the tail of the added TTFT and gaps (bench/results/before-after/gc-*.md). After
    100 middle-generation collections instead, they come minutes apart. A finished request
    leaves no cyclic garbage (tests/integration/test_reference_cycles.py), so the wait keeps
    little memory: what is left for the collector comes from rarer paths (errors with
    tracebacks, shutdown).
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)


class Lifecycle:
    """Shared by the app (readiness, 503 on asks) and the server (signals)."""

    def __init__(self, *, owns_process: bool = False) -> None:
        self.services: Services | None = None
        self.startup_problem: str | None = None
        # `qna-gateway serve` owns its process and may tune it; an app in a test does not.
        self._owns_process = owns_process

    async def bring_up(
        self,
        stack: contextlib.AsyncExitStack,
        services: Callable[[], contextlib.AbstractAsyncContextManager[Services]],
    ) -> None:
        """Enter the services, retrying with backoff while a dependency is down."""
        delay = 0.5
        while True:
            try:
                self.services = await stack.enter_async_context(services())
            except Exception as exc:
                self.startup_problem = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("start-up failed (%s); retrying in %.1fs", self.startup_problem, delay)
                await asyncio.sleep(delay * (0.75 + random.random() / 2))
                delay = min(delay * 2, 10.0)
                continue
            self.startup_problem = None
            if self._owns_process:
                settle_heap()
            log.info("ready")
            return

    @property
    def draining(self) -> bool:
        return self.services is not None and self.services.manager.draining.is_set()

    async def drain(self) -> None:
        if self.services is not None:
            await self.services.manager.drain(self.services.settings.drain_seconds)

    async def abort(self) -> None:
        """Second signal: cut every answer now, keeping what the final writes can store."""
        if self.services is not None:
            await self.services.manager.drain(0)


class GatewayServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains before the server stops.

    uvicorn alone closes its listener and then waits forever for open SSE responses; here
    the listener stays open during the drain (so new asks get a clean 503), answers finish or
    are interrupted, streams end with a terminal or `reconnect` event, and only then does
    uvicorn shut down, with nothing left open. A second signal aborts.
    """

    def __init__(self, config: uvicorn.Config, *, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._abort_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not recorded in _captured_signals: uvicorn would re-raise the signal
        # after a clean shutdown and the process would exit 143 instead of 0.
        if self._loop is None:
            self.should_exit = True
            return
        if self._drain_task is None:
            self._loop.call_soon_threadsafe(self._begin_drain)
        else:
            self._loop.call_soon_threadsafe(self._begin_abort)

    def _begin_drain(self) -> None:
        if self._drain_task is None:
            log.info("signal received: draining (a second signal stops at once)")
            self._drain_task = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._lifecycle.drain()
        finally:
            self.should_exit = True

    def _begin_abort(self) -> None:
        if self._abort_task is None:
            log.warning("second signal: stopping now")
            self._abort_task = asyncio.create_task(self._abort_then_exit())

    async def _abort_then_exit(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._lifecycle.abort(), ABORT_WRITE_SECONDS)
        self.should_exit = True
        self.force_exit = True
