"""What a stream subscriber receives about one message, and how those facts cross replicas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import msgspec

from .schemas import Message

# PostgreSQL caps a NOTIFY payload at 8000 bytes; bigger batches are announced without their
# text and the listener reads the text from the table instead.
MAX_NOTIFY_BYTES = 7_000


@dataclass(frozen=True, slots=True)
class TextAppended:
    """`text` was appended to the answer at character offset `start`."""

    start: int
    text: str

    @property
    def end(self) -> int:
        return self.start + len(self.text)


class ToolEventRecord(msgspec.Struct, frozen=True):
    """A `tool.call` or `tool.result`: the `k`-th tool event of the answer, which happened when
    the answer had `o` characters. Stored in `messages.tool_events` so replays put it back."""

    k: int
    o: int
    event: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolEventAppended:
    record: ToolEventRecord


@dataclass(frozen=True, slots=True)
class Ended:
    """The answer reached its terminal state; `message` is it as stored."""

    message: Message


@dataclass(frozen=True, slots=True)
class Resync:
    """Something may have been missed (a remote notice without text, a lost listener): re-read."""


@dataclass(frozen=True, slots=True)
class Reconnect:
    """This replica is draining: tell the client to reconnect elsewhere."""


StreamEvent = TextAppended | ToolEventAppended | Ended | Resync | Reconnect


class Notice(msgspec.Struct, omit_defaults=True):
    """The NOTIFY payload: `m` message id; `o`+`t` a text batch; `n` a text end offset; `e` the
    final status (with `h`, the chat, when a turn ended it); `c` a cancel request for the
    replica that owns the turn; `d`: the chat `m` was deleted (no message is meant)."""

    m: str
    o: int | None = None
    t: str | None = None
    n: int | None = None
    e: str | None = None
    h: str | None = None
    c: bool = False
    d: bool = False


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Notice)


def text_notice(message_id: UUID, start: int, text: str) -> str:
    payload = _encoder.encode(Notice(m=str(message_id), o=start, t=text))
    if len(payload) > MAX_NOTIFY_BYTES:
        payload = _encoder.encode(Notice(m=str(message_id), n=start + len(text)))
    return payload.decode()


def resync_notice(message_id: UUID, text_end: int) -> str:
    """Something other than text changed (a tool event): readers re-read the row."""
    return _encoder.encode(Notice(m=str(message_id), n=text_end)).decode()


def end_notice(message_id: UUID, status: str, *, chat_id: UUID | None = None) -> str:
    chat = str(chat_id) if chat_id is not None else None
    return _encoder.encode(Notice(m=str(message_id), e=status, h=chat)).decode()


def deleted_notice(chat_id: UUID) -> str:
    return _encoder.encode(Notice(m=str(chat_id), d=True)).decode()


def cancel_notice(message_id: UUID) -> str:
    return _encoder.encode(Notice(m=str(message_id), c=True)).decode()


def parse_notice(payload: str) -> Notice | None:
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError:
        return None
