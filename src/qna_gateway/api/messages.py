"""Messages: the history, asking (SSE, async or waiting), one message, its stream, cancel."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, cast

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.types import ASGIApp

from ..auth import Authenticator
from ..errors import BadRequest, problem_responses
from ..events import StreamEvent
from ..lifecycle import Services
from ..schemas import AskAccepted, AskRequest, Message, MessagePage
from ..sse import EventStreamResponse
from ..store import messages as store
from ..streams import Position, answer_events, parse_position
from .deps import authenticate, parse_uuid

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def asgi(response: object) -> ASGIApp:
    """Litestar dispatches on the value: its own Responses are rendered, other ASGI apps
    (the SSE response) are run as they are; the `ASGIApp` annotation allows both."""
    return cast(ASGIApp, response)


def event_stream(
    services: Services,
    principal: str,
    message: Message,
    position: Position | None,
    *,
    user_message: Message | None = None,
    slot: Callable[[], None] | None = None,
) -> EventStreamResponse:
    """The SSE response, holding one of the principal's stream slots (`slot`, taken here
    unless the caller already took it) while it is open."""
    release = slot or services.manager.stream_slots.acquire(principal)
    return EventStreamResponse(
        partial(answer_events, services.manager, message, position, user_message=user_message),
        headers=SSE_HEADERS,
        ping_seconds=services.settings.sse_ping_seconds,
        # A client that stops reading is dropped instead of buffering without end.
        send_timeout=services.settings.sse_send_timeout_seconds,
        on_close=release,
    )


def _ignore(event: StreamEvent) -> None:
    pass


def _wants_sse(request: Request[Any, Any, Any]) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _wants_async(request: Request[Any, Any, Any]) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


class MessageController(Controller):
    path = "/v1/chats/{chat_id:str}/messages"
    tags = ["messages"]
    security = [{"bearer": []}]
    guards = [authenticate]

    @get("/", responses=problem_responses())
    async def list_messages(
        self,
        chat_id: FromPath[str],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
        cursor: Annotated[str | None, QueryParameter(max_length=64)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
    ) -> MessagePage:
        """The chat's history, oldest first; pass `next_cursor` back as `cursor` for more."""
        async with services.pool.connection() as conn:
            return await store.list_messages(
                conn,
                principal=principal,
                chat_id=parse_uuid(chat_id, "chat id"),
                cursor=cursor,
                limit=limit,
            )

    @post(
        "/",
        status_code=200,
        responses={
            202: ResponseSpec(AskAccepted, description="`Prefer: respond-async`: stream later"),
            **problem_responses(409),
        },
        response_description=(
            "`Accept: text/event-stream`: the answer's SSE stream; otherwise the completed "
            "assistant Message."
        ),
    )
    async def ask(
        self,
        request: Request[Any, Any, Any],
        chat_id: FromPath[str],
        data: JSONBody[AskRequest],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
    ) -> ASGIApp:
        """Ask a question. The answer runs on even if this connection goes away."""
        if not data.content.strip():
            raise BadRequest("content is blank.")
        # An SSE ask takes its stream slot first: over the cap, no answer is started.
        slot = services.manager.stream_slots.acquire(principal) if _wants_sse(request) else None
        try:
            question, answer, turn = await services.manager.start_turn(
                principal=principal, chat_id=parse_uuid(chat_id, "chat id"), content=data.content
            )
        except BaseException:
            if slot is not None:
                slot()
            raise
        if slot is not None:
            return asgi(
                event_stream(services, principal, answer, None, user_message=question, slot=slot)
            )
        if _wants_async(request):
            # uvicorn already puts QNA_ROOT_PATH in front of the path; add it only if not.
            root_path = str(request.scope.get("root_path", ""))
            path = request.url.path.rstrip("/")
            stream_url = path if path.startswith(root_path + "/") else root_path + path
            stream_url += f"/{answer.id}/stream"
            auth: Authenticator = request.app.state.auth
            if auth.enabled:
                stream_url += f"?token={auth.stream_token(principal, answer.id)}"
            accepted = AskAccepted(
                user_message=question, assistant_message=answer, stream_url=stream_url
            )
            return asgi(
                Response(
                    accepted,
                    status_code=202,
                    headers={"Location": stream_url, "Preference-Applied": "respond-async"},
                )
            )
        *_, subscription = turn.subscribe(_ignore)  # a waiting caller counts as a watcher
        try:
            await turn.done.wait()
        finally:
            turn.unsubscribe(subscription)
        assert turn.final is not None
        return asgi(Response(turn.final, status_code=200))

    @get("/{message_id:str}", responses=problem_responses())
    async def get_message(
        self,
        chat_id: FromPath[str],
        message_id: FromPath[str],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
    ) -> Message:
        """One message as stored now (partial while it streams)."""
        async with services.pool.connection() as conn:
            return await store.get_message(
                conn,
                principal=principal,
                chat_id=parse_uuid(chat_id, "chat id"),
                message_id=parse_uuid(message_id, "message id"),
            )

    @get(
        "/{message_id:str}/stream",
        responses={
            204: ResponseSpec(None, description="Already received to the end"),
            **problem_responses(),
        },
        response_description="The answer's SSE stream: replay after Last-Event-ID, then live.",
    )
    async def stream(
        self,
        request: Request[Any, Any, Any],
        chat_id: FromPath[str],
        message_id: FromPath[str],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
        last_event_id: Annotated[str | None, QueryParameter(max_length=64)] = None,
    ) -> ASGIApp:
        """SSE of an answer: what the client missed (per `Last-Event-ID`), then the live tail."""
        async with services.pool.connection() as conn:
            message = await store.get_message(
                conn,
                principal=principal,
                chat_id=parse_uuid(chat_id, "chat id"),
                message_id=parse_uuid(message_id, "message id"),
            )
        if message.role != "assistant":
            raise BadRequest(f"Message {message.id} is a question; only answers have a stream.")
        raw = request.headers.get("last-event-id") or last_event_id
        position = parse_position(raw, message)
        if position is not None and position.ended and message.is_terminal:
            # 204 is the one answer that makes EventSource stop reconnecting.
            return asgi(Response(None, status_code=204))
        return asgi(event_stream(services, principal, message, position))

    @post("/{message_id:str}/cancel", status_code=200, responses=problem_responses(409))
    async def cancel(
        self,
        chat_id: FromPath[str],
        message_id: FromPath[str],
        services: NamedDependency[Services],
        principal: NamedDependency[str],
    ) -> Message:
        """Stop a running answer; it ends `cancelled` with the text produced so far."""
        async with services.pool.connection() as conn:
            message = await store.get_message(
                conn,
                principal=principal,
                chat_id=parse_uuid(chat_id, "chat id"),
                message_id=parse_uuid(message_id, "message id"),
            )
        if message.role != "assistant":
            raise BadRequest(f"Message {message.id} is a question; only answers can be cancelled.")
        return await services.manager.cancel(message)
