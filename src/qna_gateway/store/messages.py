"""Queries on messages: the ask transaction, history, batched appends and final states."""

from __future__ import annotations

from typing import Any, TypeVar, cast
from uuid import UUID, uuid4

import msgspec
from psycopg import AsyncConnection, errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..errors import Conflict, NotFound
from ..events import MAX_NOTIFY_BYTES
from ..schemas import Message, MessagePage, Source, Usage
from .cursors import decode_cursor, encode_cursor

T = TypeVar("T")

# Every message change is announced here; the payload names the message (see pubsub.py)...
EVENTS_CHANNEL = "qna_events"
# ...except streamed text, which goes to a channel of the answer's own: only a replica that
# follows the answer LISTENs there, so PostgreSQL delivers the bulk of the notices (one per
# answer per batch interval) to nobody, instead of to every replica, its writer included.
TEXT_CHANNEL_PREFIX = "qna_text_"


def text_channel(message_id: UUID) -> str:
    """The channel of `message_id`'s text notices (a lowercase identifier, 41 characters)."""
    return TEXT_CHANNEL_PREFIX + message_id.hex


_COLUMNS = (
    "m.id, m.seq, m.chat_id, m.role, m.content, m.status, m.finish_reason, m.error, m.model,"
    " m.input_tokens, m.output_tokens, m.sources, m.created_at, m.completed_at, m.owner_id"
)


def storable(value: T) -> T:
    """`value` with every NUL in its strings replaced: PostgreSQL's text and jsonb cannot hold
    one, and what the LLM sends (text, tool arguments, error bodies) may."""
    if isinstance(value, str):
        return cast(T, value.replace("\x00", "\ufffd")) if "\x00" in value else value
    if isinstance(value, dict):
        return cast(T, {storable(k): storable(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return cast(T, [storable(v) for v in value])
    return value


def message_from_row(row: dict[str, Any]) -> Message:
    usage = None
    if row["input_tokens"] is not None or row["output_tokens"] is not None:
        usage = Usage(
            input_tokens=row["input_tokens"] or 0, output_tokens=row["output_tokens"] or 0
        )
    sources = None
    if row["sources"] is not None:
        sources = msgspec.convert(row["sources"], list[Source])
    return Message(
        id=row["id"],
        chat_id=row["chat_id"],
        role=row["role"],
        content=row["content"],
        status=row["status"],
        finish_reason=row["finish_reason"],
        error=row["error"],
        model=row["model"],
        usage=usage,
        sources=sources,
        created_at=row["created_at"],
        completed_at=row["completed_at"],
    )


async def insert_exchange(
    conn: AsyncConnection,
    *,
    principal: str,
    chat_id: UUID,
    content: str,
    model: str,
    owner_id: UUID,
    history_chars: int,
) -> tuple[Message, Message, list[tuple[str, str]]]:
    """Store the question and an empty `streaming` answer, and read the history the model
    gets: one statement, one round trip.

    The history is the newest (role, content) pairs before the question whose text fits in
    `history_chars`, oldest first; empty answers (failed before any text) carry nothing for
    the model and are left out. The chat row is locked first, so asks on one chat queue; a
    second ask while one streams is a 409, and the partial unique index on streaming messages
    makes a race between replicas one too.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        try:
            await cur.execute(_INSERT_EXCHANGE, {
                "chat_id": chat_id,
                "principal": principal,
                "question_id": uuid4(),
                "answer_id": uuid4(),
                "content": content,
                "model": model,
                "owner_id": owner_id,
                "history_chars": history_chars,
            })  # fmt: skip
            rows = await cur.fetchall()
        except errors.UniqueViolation:
            # Another ask committed its answer while this one waited for the chat's lock.
            running = await streaming_message_of_chat(conn, chat_id=chat_id)
            if running is not None:
                raise _busy(chat_id, running) from None
            raise Conflict(f"Chat {chat_id} is already answering a question.") from None
    first = rows[0]
    if not first["chat_found"]:
        raise NotFound(f"There is no chat {chat_id}.")
    if first["running_id"] is not None:
        raise _busy(chat_id, first["running_id"])
    question, answer = rows
    history = [(role, text) for role, text in first["history"] or ()]
    return message_from_row(question), message_from_row(answer), history


_INSERT_EXCHANGE = f"""
WITH RECURSIVE chat AS MATERIALIZED (
    SELECT id FROM chats WHERE id = %(chat_id)s AND principal = %(principal)s FOR UPDATE
), running AS MATERIALIZED (
    SELECT m.id FROM messages AS m, chat
    WHERE m.chat_id = chat.id AND m.status = 'streaming' LIMIT 1
), question AS (
    INSERT INTO messages AS m (id, chat_id, role, content, status)
    SELECT %(question_id)s, chat.id, 'user', %(content)s, 'completed' FROM chat
    WHERE NOT EXISTS (SELECT 1 FROM running)
    RETURNING {_COLUMNS}
), answer AS (
    INSERT INTO messages AS m (id, chat_id, role, status, model, owner_id)
    SELECT %(answer_id)s, question.chat_id, 'assistant', 'streaming', %(model)s, %(owner_id)s
    FROM question
    RETURNING {_COLUMNS}
), touched AS (
    UPDATE chats SET updated_at = now() WHERE id IN (SELECT chat_id FROM answer)
), walk AS (
    -- Newest first, one index probe a message, until the budget is spent: an ask on a long
    -- chat reads what its history sends, not the whole chat (a window over every message
    -- took 19 ms at 5,000). The statement's snapshot holds the messages before this
    -- question, not the new rows.
    -- chat_id as a value in both parts, so both scan messages_chat_seq backwards (joined to
    -- `chat`, the first row was looked for from the newest message of every chat).
    (SELECT m.seq, m.role, m.content, char_length(m.content) AS used
     FROM messages AS m WHERE m.chat_id = %(chat_id)s AND EXISTS (SELECT FROM chat)
     ORDER BY m.seq DESC LIMIT 1)
    UNION ALL
    (SELECT older.seq, older.role, older.content, walk.used + char_length(older.content)
     FROM walk, LATERAL (
         SELECT m.seq, m.role, m.content FROM messages AS m
         WHERE m.chat_id = %(chat_id)s AND m.seq < walk.seq ORDER BY m.seq DESC LIMIT 1
     ) AS older
     WHERE walk.used <= %(history_chars)s)
), history AS (
    SELECT role, content, seq FROM walk WHERE used <= %(history_chars)s AND content <> ''
)
SELECT flags.*, exchange.*
FROM (
    SELECT EXISTS (SELECT 1 FROM chat) AS chat_found, (SELECT id FROM running) AS running_id,
           (SELECT json_agg(json_build_array(role, content) ORDER BY seq) FROM history)
               AS history
) AS flags
LEFT JOIN (SELECT * FROM question UNION ALL SELECT * FROM answer) AS exchange ON true
ORDER BY exchange.seq
"""


def _busy(chat_id: UUID, message_id: UUID) -> Conflict:
    return Conflict(
        f"Chat {chat_id} is still answering message {message_id}; wait for it to finish "
        f"or cancel it first."
    )


async def get_message(
    conn: AsyncConnection, *, principal: str, chat_id: UUID, message_id: UUID
) -> Message:
    row = await get_message_row(conn, principal=principal, chat_id=chat_id, message_id=message_id)
    return message_from_row(row)


async def get_message_row(
    conn: AsyncConnection, *, principal: str, chat_id: UUID, message_id: UUID
) -> dict[str, Any]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM messages m JOIN chats c ON c.id = m.chat_id"
            " WHERE m.id = %s AND m.chat_id = %s AND c.principal = %s",
            (message_id, chat_id, principal),
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound(f"There is no message {message_id} in chat {chat_id}.")
    return row


async def read_message(conn: AsyncConnection, *, message_id: UUID) -> Message | None:
    """The message as stored now, without an ownership check (for internal readers)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {_COLUMNS} FROM messages m WHERE m.id = %s", (message_id,))
        row = await cur.fetchone()
    return None if row is None else message_from_row(row)


async def list_messages(
    conn: AsyncConnection, *, principal: str, chat_id: UUID, cursor: str | None, limit: int
) -> MessagePage:
    after = decode_cursor("messages", cursor) if cursor else None
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT 1 FROM chats WHERE id = %s AND principal = %s", (chat_id, principal)
        )
        if await cur.fetchone() is None:
            raise NotFound(f"There is no chat {chat_id}.")
        await cur.execute(
            f"SELECT {_COLUMNS} FROM messages m WHERE m.chat_id = %s"
            " AND (%s::bigint IS NULL OR m.seq > %s::bigint) ORDER BY m.seq LIMIT %s",
            (chat_id, after, after, limit + 1),
        )
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return MessagePage(
        data=[message_from_row(r) for r in rows],
        next_cursor=encode_cursor("messages", rows[-1]["seq"]) if more else None,
    )


async def streaming_message_of_chat(conn: AsyncConnection, *, chat_id: UUID) -> UUID | None:
    cur = await conn.execute(
        "SELECT id FROM messages WHERE chat_id = %s AND status = 'streaming'", (chat_id,)
    )
    row = await cur.fetchone()
    return None if row is None else UUID(str(row[0]))


async def append_text(
    conn: AsyncConnection, *, message_id: UUID, offset: int, text: str, notify: str
) -> bool:
    """Append a batch at `offset` and announce it: one statement, one round trip, atomic.

    The offset guard makes a retried batch a no-op instead of doubled text; False means the
    stored text is not where the caller thinks (it then rewrites the whole text).
    """
    cur = await conn.execute(
        "WITH appended AS (UPDATE messages SET content = content || %s"
        " WHERE id = %s AND status = 'streaming' AND char_length(content) = %s RETURNING id)"
        " SELECT pg_notify(%s, %s) FROM appended",
        (text, message_id, offset, text_channel(message_id), notify),
    )
    return await cur.fetchone() is not None


class TextBatch(msgspec.Struct, array_like=True):
    """One answer's new text for `append_batches`: where it starts, and the text."""

    id: UUID
    start: int
    text: str


_encode_batches = msgspec.json.Encoder().encode


async def append_batches(conn: AsyncConnection, batches: list[TextBatch]) -> set[UUID]:
    """Append many answers' batches and announce each on its text channel: one statement.

    Each batch applies only where the stored text ends at its offset (a retried batch is a
    no-op, not doubled text); the ids returned are those that applied. The batches travel as
    one JSON document of `[id, start, text]` arrays: encoding it is one C call, where arrays
    of text were dumped item by item. The server builds each notice from the row it updated
    (as `events.text_notice` does: the text, or past MAX_NOTIFY_BYTES only where it ends), so
    the text crosses the wire once, not once more inside a prebuilt notice.
    """
    cur = await conn.execute(
        "WITH batch AS (SELECT (b->>0)::uuid AS id, (b->>1)::int AS start, b->>2 AS text"
        " FROM json_array_elements(%s::json) AS b),"
        " appended AS (UPDATE messages AS m SET content = m.content || b.text FROM batch AS b"
        " WHERE m.id = b.id AND m.status = 'streaming' AND char_length(m.content) = b.start"
        " RETURNING m.id, b.start, b.text),"
        " noticed AS (SELECT id, start + char_length(text) AS text_end,"
        " json_build_object('m', id, 'o', start, 't', text)::text AS notice FROM appended)"
        # text_channel(id), spelled in SQL: uuid::text is the lowercase hex with hyphens.
        " SELECT id, pg_notify(%s || replace(id::text, '-', ''),"
        " CASE WHEN octet_length(notice) <= %s THEN notice"
        " ELSE json_build_object('m', id, 'n', text_end)::text END) FROM noticed",
        (_encode_batches(batches).decode(), TEXT_CHANNEL_PREFIX, MAX_NOTIFY_BYTES),
    )
    return {row[0] for row in await cur.fetchall()}


async def rewrite_text(conn: AsyncConnection, *, message_id: UUID, text: str, notify: str) -> bool:
    cur = await conn.execute(
        "WITH rewritten AS (UPDATE messages SET content = %s"
        " WHERE id = %s AND status = 'streaming' RETURNING id)"
        " SELECT pg_notify(%s, %s) FROM rewritten",
        (text, message_id, text_channel(message_id), notify),
    )
    return await cur.fetchone() is not None


async def finish_message(
    conn: AsyncConnection,
    *,
    message_id: UUID,
    text: str,
    status: str,
    finish_reason: str | None,
    error: str | None,
    usage: Usage | None,
    sources: list[Source] | None,
    tool_events: list[Any] | None = None,
    notify: str,
) -> Message | None:
    """Write the final text and status, once (a message that already ended is left alone),
    and announce it: one statement."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "WITH finished AS (UPDATE messages AS m SET content = %s, status = %s,"
            " finish_reason = %s, error = %s, input_tokens = %s, output_tokens = %s,"
            " sources = %s, completed_at = now(), tool_events = coalesce(%s, tool_events)"
            f" WHERE id = %s AND status = 'streaming' RETURNING {_COLUMNS})"
            f" SELECT {_COLUMNS}, pg_notify(%s, %s) AS announced FROM finished AS m",
            (
                text,
                status,
                finish_reason,
                error,
                usage.input_tokens if usage else None,
                usage.output_tokens if usage else None,
                Jsonb(msgspec.to_builtins(sources)) if sources is not None else None,
                Jsonb(tool_events) if tool_events is not None else None,
                message_id,
                EVENTS_CHANNEL,
                notify,
            ),
        )
        row = await cur.fetchone()
    return message_from_row(row) if row is not None else None


async def append_tool_event(
    conn: AsyncConnection, *, message_id: UUID, record: Any, notify: str
) -> None:
    await conn.execute(
        "WITH appended AS (UPDATE messages SET tool_events = tool_events || %s"
        " WHERE id = %s AND status = 'streaming' RETURNING id)"
        " SELECT pg_notify(%s, %s) FROM appended",
        (Jsonb([record]), message_id, EVENTS_CHANNEL, notify),
    )


async def read_answer(
    conn: AsyncConnection, *, message_id: UUID
) -> tuple[Message, list[Any]] | None:
    """The message and its stored tool events (for replaying a stream)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS}, m.tool_events FROM messages m WHERE m.id = %s", (message_id,)
        )
        row = await cur.fetchone()
    if row is None:
        return None
    return message_from_row(row), list(row["tool_events"])


async def mark_watched(conn: AsyncConnection, *, message_id: UUID) -> None:
    """A stream on another replica is watching: the owner must not treat the turn as orphaned."""
    await conn.execute(
        "UPDATE messages SET watched_at = now() WHERE id = %s AND status = 'streaming'",
        (message_id,),
    )


async def notify(conn: AsyncConnection, *, payload: str) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, payload))
