"""The psycopg connection pool, opened explicitly by the app's lifespan."""

from __future__ import annotations

import select
from typing import Any

from psycopg import (
    AsyncConnection,
    AsyncCursor,
    DataError,
    Error,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
)
from psycopg_pool import AsyncConnectionPool, PoolTimeout

Pool = AsyncConnectionPool[AsyncConnection]
# What a statement can fail with when the database is away or slow: callers that can wait
# (a batch, a heartbeat) catch these and try again later.
DB_ERRORS = (Error, PoolTimeout, OSError)
# ...except these, about the data rather than the connection: the same statement cannot succeed.
NOT_TRANSIENT = (DataError, IntegrityError, ProgrammingError, NotSupportedError)


def make_pool(
    conninfo: str,
    *,
    min_size: int,
    max_size: int,
    timeout: float,
    cursor_factory: type[AsyncCursor[Any]] | None = None,
) -> Pool:
    """A closed pool; the caller opens it (so nothing connects at construction)."""
    return AsyncConnectionPool(
        conninfo,
        min_size=min_size,
        max_size=max(min_size, max_size),
        timeout=timeout,
        open=False,
        name="qna-gateway",
        # Autocommit: a lone statement is its own transaction (no BEGIN/COMMIT round trips,
        # which dominated the per-batch cost); multi-statement work uses conn.transaction().
        kwargs={
            "autocommit": True,
            **({"cursor_factory": cursor_factory} if cursor_factory else {}),
        },
        # A dead connection is dropped when it is handed out, not when a query fails on it.
        check=check_if_spoken,
    )


async def check_if_spoken(conn: AsyncConnection) -> None:
    """The pool's check on handing a connection out, without a round trip per checkout.

    An idle pooled connection has nothing to read unless the server closed it (a restart, an
    idle timeout, a proxy cut) or sent it a notice: only then is it tested with a query, and
    the pool drops it if that fails. A round trip on every checkout cost more than the
    statement it guarded.
    """
    if conn.closed:
        raise OSError("the connection is closed")
    poller = select.poll()  # not select(): descriptors past 1024 are common under load
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        await AsyncConnectionPool.check_connection(conn)
