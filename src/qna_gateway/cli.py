"""`qna-gateway serve | migrate | kb sync`: the command line.

The web stack is imported only by the commands that need it, so `--help` and a settings
error answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from . import __version__
from .settings import Settings, SettingsError

log = logging.getLogger("qna_gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qna-gateway",
        description="Streaming Q&A chat gateway. Settings come from the environment and .env; "
        "see the README for every variable.",
    )
    parser.add_argument("--version", action="version", version=f"qna-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP gateway (migrates first)")
    serve.add_argument("--host", help="bind address (default QNA_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default QNA_PORT or 8000)")
    commands.add_parser("migrate", help="apply the database migrations and exit")
    kb = commands.add_parser("kb", help="knowledge-base operations")
    kb_commands = kb.add_subparsers(dest="kb_command", required=True, metavar="KB_COMMAND")
    kb_commands.add_parser("sync", help="load QNA_KB_DIR into PostgreSQL (changed files only)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"qna-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    from .logs import configure_logging

    configure_logging(settings)
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    if args.command == "kb":
        return asyncio.run(_kb_sync(settings))
    if args.host:
        settings = replace(settings, host=args.host)
    if args.port is not None:
        settings = replace(settings, port=args.port)
    return _serve(settings)


async def _migrate(settings: Settings) -> int:
    from .lifecycle import resolve_database
    from .store.migrations import apply_migrations

    conninfo, embedded = await resolve_database(settings, None)
    try:
        applied = await apply_migrations(conninfo)
    finally:
        if embedded is not None:
            await embedded.stop()
    print(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))
    return 0


async def _kb_sync(settings: Settings) -> int:
    from psycopg import AsyncConnection

    from .kb import read_documents, sync_documents
    from .lifecycle import resolve_database
    from .store.migrations import apply_migrations

    conninfo, embedded = await resolve_database(settings, None)
    try:
        await apply_migrations(conninfo)
        documents = await asyncio.to_thread(read_documents, settings.kb_dir)
        async with await AsyncConnection.connect(conninfo) as conn:
            report = await sync_documents(conn, documents)
    finally:
        if embedded is not None:
            await embedded.stop()
    print(
        f"knowledge base {settings.kb_dir}: {len(report.added)} added, {len(report.changed)} "
        f"changed, {len(report.removed)} removed, {report.unchanged} unchanged, "
        f"{report.chunks_written} chunks written"
    )
    return 0


def _serve(settings: Settings) -> int:
    import uvicorn

    from .app import create_app
    from .auth import Authenticator, is_loopback
    from .lifecycle import GatewayServer, Lifecycle

    auth = Authenticator.from_settings(settings)
    if not auth.enabled and not is_loopback(settings.host) and settings.auth != "disabled":
        print(
            f"qna-gateway: refusing to serve on {settings.host} without authentication: set "
            "QNA_API_KEYS (or QNA_JWT_SECRET / QNA_JWT_JWKS_URL), or QNA_AUTH=disabled if "
            "something in front of the gateway authenticates.",
            file=sys.stderr,
        )
        return 2
    if not auth.enabled:
        log.warning("authentication is off: every caller is the one principal 'anonymous'")
    lifecycle = Lifecycle(owns_process=True)
    app = create_app(settings, lifecycle=lifecycle)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=5,
        root_path=settings.root_path,
        server_header=False,
    )
    server = GatewayServer(config, lifecycle=lifecycle)
    server.run()
    # uvicorn returns normally after a clean drain; a failed start-up leaves started False.
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
