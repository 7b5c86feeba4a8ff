"""msgspec Structs for the HTTP API: requests with limits, responses as stored."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec
from msgspec import Meta, Struct

MAX_CONTENT_CHARS = 32_000
MAX_TITLE_CHARS = 200
MAX_METADATA_KEYS = 32
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 1_000

Role = Literal["user", "assistant"]
Status = Literal["streaming", "completed", "failed", "cancelled", "interrupted"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "interrupted"})

# PostgreSQL text cannot hold NUL; refusing it here makes it a 400, not a failed INSERT.
NO_NUL = "^[^\x00]*$"

MetadataKey = Annotated[str, Meta(min_length=1, max_length=MAX_METADATA_KEY_CHARS, pattern=NO_NUL)]
MetadataValue = (
    Annotated[str, Meta(max_length=MAX_METADATA_VALUE_CHARS, pattern=NO_NUL)]
    | int
    | float
    | bool
    | None
)
Metadata = Annotated[
    dict[MetadataKey, MetadataValue],
    Meta(max_length=MAX_METADATA_KEYS, description="Flat key/value labels for the client's use."),
]


class ChatCreate(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /v1/chats`."""

    title: Annotated[str, Meta(max_length=MAX_TITLE_CHARS, pattern=NO_NUL)] | None = None
    metadata: Metadata | None = None


class AskRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of `POST /v1/chats/{chat_id}/messages`."""

    content: Annotated[str, Meta(min_length=1, max_length=MAX_CONTENT_CHARS, pattern=NO_NUL)]


class Chat(Struct, kw_only=True):
    id: UUID
    title: str | None
    metadata: dict[str, MetadataValue]
    created_at: datetime
    updated_at: datetime


class Usage(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int


class Source(Struct, kw_only=True):
    """A knowledge-base passage an answer drew on."""

    document: str
    title: str
    chunk: int
    score: float
    snippet: str


class Message(Struct, kw_only=True):
    id: UUID
    chat_id: UUID
    role: Role
    content: str
    status: Status
    finish_reason: str | None = None
    error: str | None = None
    model: str | None = None
    usage: Usage | None = None
    sources: list[Source] | None = None
    created_at: datetime
    completed_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class MessageStarted(Message, kw_only=True):
    """`message.started` data: the assistant message, and on an ask the question too."""

    user_message: Message | None = None


class ChatPage(Struct, kw_only=True):
    data: list[Chat]
    next_cursor: str | None


class MessagePage(Struct, kw_only=True):
    data: list[Message]
    next_cursor: str | None


class AskAccepted(Struct, kw_only=True):
    """`202` answer to an ask with `Prefer: respond-async`."""

    user_message: Message
    assistant_message: Message
    stream_url: str


class Delta(Struct):
    text: str


class Problem(Struct, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem document."""

    status: int
    title: str
    detail: str
    type: str = "about:blank"
    instance: str | None = None
    errors: list[dict[str, str]] | None = None


json_encoder = msgspec.json.Encoder()
