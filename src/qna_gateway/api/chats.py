"""Chats: create, list, get, delete."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from ..errors import problem_responses
from ..events import deleted_notice
from ..lifecycle import Services
from ..schemas import Chat, ChatCreate, ChatPage
from ..store import chats as store
from ..store import messages as message_store
from .deps import authenticate, parse_uuid


class ChatController(Controller):
    path = "/v1/chats"
    tags = ["chats"]
    security = [{"bearer": []}]
    guards = [authenticate]

    @post("/", status_code=201, responses=problem_responses())
    async def create_chat(
        self,
        data: JSONBody[ChatCreate],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
    ) -> Chat:
        """Create a chat."""
        async with services.pool.connection() as conn:
            chat = await store.create_chat(
                conn, principal=principal, title=data.title, metadata=data.metadata or {}
            )
        services.telemetry.metrics.chat_sessions.inc()
        services.manager.chat_created(principal, chat.id)
        return chat

    @get("/", responses=problem_responses())
    async def list_chats(
        self,
        services: NamedDependency[Services],
        principal: NamedDependency[str],
        cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=100)] = 20,
    ) -> ChatPage:
        """The caller's chats, newest first; pass `next_cursor` back as `cursor` for more."""
        async with services.pool.connection() as conn:
            return await store.list_chats(conn, principal=principal, cursor=cursor, limit=limit)

    @get("/{chat_id:str}", responses=problem_responses())
    async def get_chat(
        self,
        chat_id: FromPath[str],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
    ) -> Chat:
        """One chat."""
        async with services.pool.connection() as conn:
            return await store.get_chat(
                conn, principal=principal, chat_id=parse_uuid(chat_id, "chat id")
            )

    @delete("/{chat_id:str}", status_code=204, responses=problem_responses())
    async def delete_chat(
        self,
        chat_id: FromPath[str],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
    ) -> None:
        """Delete a chat and its messages; a running answer is cancelled first."""
        cid = parse_uuid(chat_id, "chat id")
        async with services.pool.connection() as conn:
            await store.get_chat(conn, principal=principal, chat_id=cid)
            running = await message_store.streaming_message_of_chat(conn, chat_id=cid)
            message = (
                await message_store.read_message(conn, message_id=running) if running else None
            )
        if message is not None and not message.is_terminal:
            await services.manager.cancel(message)
        # Forgotten before and after: an answer ending meanwhile would record it again.
        services.manager.chat_deleted(cid)
        async with services.pool.connection() as conn, conn.transaction():
            await store.delete_chat(conn, principal=principal, chat_id=cid)
            # One transaction: the other replicas hear of the delete exactly when it is done.
            await message_store.notify(conn, payload=deleted_notice(cid))
        services.manager.chat_deleted(cid)
