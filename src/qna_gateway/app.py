"""The app factory: routes, dependencies, error mapping and the lifespan, in one place."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

from litestar import Litestar, Request, Response, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp

from . import __version__
from .answers import Answerer
from .api.admin import AdminController
from .api.chats import ChatController
from .api.deps import provide_admin, provide_principal, provide_services
from .api.health import health, ready
from .api.messages import MessageController
from .api.page import asset, page
from .auth import Authenticator
from .errors import exception_handlers
from .lifecycle import Lifecycle, running_services
from .limits import RateLimiter
from .middleware import ObservabilityMiddleware
from .openapi_doc import fix_overlapping_one_of
from .settings import Settings
from .tasks import cancel_and_wait
from .telemetry import Telemetry, create_telemetry


def create_app(
    settings: Settings,
    *,
    answerer: Answerer | None = None,
    lifecycle: Lifecycle | None = None,
    telemetry: Telemetry | None = None,
) -> Litestar:
    """Build the app; nothing connects until the lifespan starts."""
    lifecycle = lifecycle or Lifecycle()
    telemetry = telemetry or create_telemetry()

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        # The server answers (/health 200, /ready 503) while the services come up, so a
        # database that is down at start is waited for instead of failing the process.
        async with contextlib.AsyncExitStack() as stack:
            bring_up = asyncio.create_task(
                lifecycle.bring_up(
                    stack, lambda: running_services(settings, telemetry, answerer=answerer)
                )
            )
            try:
                yield
            finally:
                await cancel_and_wait(bring_up)
                lifecycle.services = None
        # Last, after the drain and the final writes: their spans are exported too.
        telemetry.shutdown()

    @get("/metrics", tags=["probes"], media_type="text/plain")
    async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Prometheus metrics; OpenMetrics (with exemplars) when the scraper asks for it."""
        openmetrics = "application/openmetrics-text" in request.headers.get("accept", "")
        body, content_type = telemetry.metrics.render(openmetrics=openmetrics)
        return Response(body, media_type=content_type)

    app = Litestar(
        route_handlers=[
            health,
            ready,
            metrics,
            ChatController,
            MessageController,
            AdminController,
            page,
            asset,
        ],
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "principal": Provide(provide_principal, sync_to_thread=False),
            "admin": Provide(provide_admin, sync_to_thread=False),
        },
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="qna-gateway",
            version=__version__,
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="An API key from QNA_API_KEYS, or a JWT (when configured).",
                    )
                }
            ),
        ),
        logging_config=None,
    )
    fix_overlapping_one_of(app)
    app.state.lifecycle = lifecycle
    app.state.settings = settings
    app.state.telemetry = telemetry
    app.state.auth = Authenticator.from_settings(settings)
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute)
    # Outside the exception handling and routing: sees every request and its final status.
    app.asgi_handler = cast(
        ASGIApp,
        ObservabilityMiddleware(
            app.asgi_handler, telemetry, max_header_bytes=settings.max_header_bytes
        ),
    )
    return app
