"""The app factory: routes, dependencies, error mapping and the lifespan, in one place."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from sse_starlette.sse import AppStatus

from . import __version__
from .answers import Answerer
from .api.admin import AdminController
from .api.chats import ChatController
from .api.deps import provide_admin, provide_principal, provide_services
from .api.health import health, ready
from .api.messages import MessageController
from .errors import exception_handlers
from .lifecycle import Lifecycle, running_services
from .settings import Settings


def create_app(
    settings: Settings,
    *,
    answerer: Answerer | None = None,
    lifecycle: Lifecycle | None = None,
) -> Litestar:
    """Build the app; nothing connects until the lifespan starts."""
    lifecycle = lifecycle or Lifecycle()

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        # sse-starlette would cut every stream, without a final event, as soon as uvicorn
        # begins to exit; the gateway's own drain ends streams properly instead.
        AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
        async with running_services(settings, answerer=answerer) as services:
            lifecycle.services = services
            try:
                yield
            finally:
                lifecycle.services = None

    app = Litestar(
        route_handlers=[health, ready, ChatController, MessageController, AdminController],
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
        ),
        logging_config=None,
    )
    app.state.lifecycle = lifecycle
    app.state.settings = settings
    return app
