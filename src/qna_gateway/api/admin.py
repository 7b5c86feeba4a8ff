"""Admin endpoints: operations on the gateway itself."""

from __future__ import annotations

from litestar import Controller, post
from litestar.di import NamedDependency
from msgspec import Struct

from ..errors import problem_responses
from ..lifecycle import Services
from .deps import authenticate


class SyncResult(Struct, kw_only=True):
    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    chunks_written: int


class AdminController(Controller):
    path = "/v1/admin"
    tags = ["admin"]
    security = [{"bearer": []}]
    guards = [authenticate]

    @post("/kb/sync", status_code=200, responses=problem_responses(403))
    async def sync_knowledge_base(
        self, services: NamedDependency[Services], admin: NamedDependency[str]
    ) -> SyncResult:
        """Re-read the knowledge-base folder; only changed documents are rewritten."""
        report = await services.kb.sync(services.settings.kb_dir)
        return SyncResult(
            added=report.added,
            changed=report.changed,
            removed=report.removed,
            unchanged=report.unchanged,
            chunks_written=report.chunks_written,
        )
