"""Queries on chats. Every query is scoped to the principal that owns the chat."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..errors import NotFound
from ..schemas import Chat, ChatPage
from .cursors import decode_cursor, encode_cursor

_COLUMNS = "id, seq, title, metadata, created_at, updated_at"


def _chat(row: dict[str, Any]) -> Chat:
    return Chat(
        id=row["id"],
        title=row["title"],
        metadata=row["metadata"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def create_chat(
    conn: AsyncConnection, *, principal: str, title: str | None, metadata: dict[str, Any]
) -> Chat:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"INSERT INTO chats (id, principal, title, metadata) VALUES (%s, %s, %s, %s)"
            f" RETURNING {_COLUMNS}",
            (uuid4(), principal, title, Jsonb(metadata)),
        )
        row = await cur.fetchone()
    assert row is not None
    return _chat(row)


async def get_chat(conn: AsyncConnection, *, principal: str, chat_id: UUID) -> Chat:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM chats WHERE id = %s AND principal = %s",
            (chat_id, principal),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"There is no chat {chat_id}.")
    return _chat(row)


async def list_chats(
    conn: AsyncConnection, *, principal: str, cursor: str | None, limit: int
) -> ChatPage:
    """Newest first; the cursor is the last row's seq, so pages stay stable under inserts."""
    before = decode_cursor("chats", cursor) if cursor else None
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM chats WHERE principal = %s"
            " AND (%s::bigint IS NULL OR seq < %s::bigint) ORDER BY seq DESC LIMIT %s",
            (principal, before, before, limit + 1),
        )
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return ChatPage(
        data=[_chat(r) for r in rows],
        next_cursor=encode_cursor("chats", rows[-1]["seq"]) if more else None,
    )


async def delete_chat(conn: AsyncConnection, *, principal: str, chat_id: UUID) -> None:
    cur = await conn.execute(
        "DELETE FROM chats WHERE id = %s AND principal = %s", (chat_id, principal)
    )
    if cur.rowcount == 0:
        raise NotFound(f"There is no chat {chat_id}.")
