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
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool, PoolTimeout

Pool = AsyncConnectionPool[AsyncConnection]
# What a statement can fail with when the database is away or slow: callers that can wait
# (a batch, a heartbeat) catch these and try again later.
DB_ERRORS = (Error, PoolTimeout, OSError)
# ...except these, about the data rather than the connection: the same statement cannot succeed.
NOT_TRANSIENT = (DataError, IntegrityError, ProgrammingError, NotSupportedError)


# libpq turns TCP keepalives on but leaves their timing to the kernel: two hours of silence
# before the first probe. A connection whose server vanished without a FIN or RST (a failover,
# a dropped NAT or load-balancer entry, a cut link) would pass for alive that long: the event
# listener would wait for notices that never come (another replica's cancel among them), and a
# statement sent on it would wait for its answer. With these, such a connection fails within
# about a minute: three unanswered probes 10 s apart after 30 s idle, or 60 s with data sent
# and not acknowledged. Unix-socket connections ignore them. A DATABASE_URL that sets any of
# them keeps its own value.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",  # milliseconds
}


def with_keepalives(conninfo: str) -> str:
    """`conninfo` with the KEEPALIVES it does not set itself."""
    given = conninfo_to_dict(conninfo)
    missing = {k: v for k, v in KEEPALIVES.items() if k not in given}
    return make_conninfo(conninfo, **missing) if missing else conninfo


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
