"""What handlers are given: the running services, the caller's principal, parsed ids."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from litestar import Request
from litestar.di import NamedDependency

from ..errors import BadRequest, Unavailable
from ..lifecycle import Lifecycle, Services

ANONYMOUS = "anonymous"


def provide_services(request: Request[Any, Any, Any]) -> Services:
    lifecycle: Lifecycle = request.app.state.lifecycle
    if lifecycle.services is None:
        raise Unavailable("The gateway is still starting.", headers={"Retry-After": "1"})
    return lifecycle.services


def provide_principal() -> str:
    # Every chat belongs to a principal; until API keys are configured there is one.
    return ANONYMOUS


def provide_admin(principal: NamedDependency[str]) -> str:
    """The principal, when it may use admin endpoints. Without API keys (auth off, loopback
    only) the one principal is the operator, so it may."""
    return principal


def parse_uuid(value: str, what: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise BadRequest(f"{what} {value[:80]!r} is not a UUID.") from None
