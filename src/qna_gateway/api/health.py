"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get

from ..lifecycle import Lifecycle

READY_DB_TIMEOUT_SECONDS = 2.0


@get("/health", sync_to_thread=False, include_in_schema=True, tags=["probes"])
def health() -> dict[str, str]:
    """Liveness: 200 while the process serves requests; checks nothing external."""
    return {"status": "ok"}


@get("/ready", tags=["probes"])
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Readiness: 200 when PostgreSQL answers and the gateway is not draining."""
    lifecycle: Lifecycle = request.app.state.lifecycle
    checks: dict[str, str] = {}
    services = lifecycle.services
    if services is None:
        checks["startup"] = lifecycle.startup_problem or "starting"
    else:
        checks["draining"] = "draining" if lifecycle.draining else "ok"
        try:
            async with asyncio.timeout(READY_DB_TIMEOUT_SECONDS):
                async with services.pool.connection() as conn:
                    await conn.execute("SELECT 1")
            checks["database"] = "ok"
        except Exception as exc:  # any failure at all means "not ready"
            checks["database"] = f"failing: {type(exc).__name__}"
    ok = all(value == "ok" for value in checks.values())
    return Response(
        {"status": "ready" if ok else "unavailable", "checks": checks},
        status_code=200 if ok else 503,
    )
