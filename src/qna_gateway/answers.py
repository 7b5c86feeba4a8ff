"""What an answerer yields while it answers, and the Protocol every answerer implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from .schemas import Source, Usage


@dataclass(frozen=True, slots=True)
class ToolCalled:
    """The model asked for a tool; `arguments` is its raw JSON text, valid or not."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    sources: list[Source]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class UsageReported:
    usage: Usage


@dataclass(frozen=True, slots=True)
class Finished:
    reason: str


AnswerEvent = ToolCalled | ToolResult | UsageReported | Finished

# Where an answerer puts its text, piece by piece as it comes. It is called synchronously,
# possibly from a network callback rather than the task iterating the answer: it must be
# quick and must not wait. What it raises fails the answer.
TextSink = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ChatLine:
    """One line of the conversation the answerer sees."""

    role: Literal["system", "user", "assistant"]
    content: str


class AnswerError(Exception):
    """The answer could not be produced. A timeout ends the message `interrupted` with
    `finish_reason` = its `kind` (which timeout); anything else ends it `failed`."""

    def __init__(self, message: str, *, timeout: bool = False, kind: str = "error") -> None:
        super().__init__(message)
        self.timeout = timeout
        self.kind = kind  # the span's error.type, and the interruption's reason


class EarlyCall(Protocol):
    """An answer's first LLM request, sent before its question was stored (`start_early`).
    Given to `answer` for the same conversation it goes on from there; else `abandon` it."""

    @property
    def conversation(self) -> Sequence[ChatLine]: ...

    @property
    def started(self) -> float:
        """When the request started, as `time.monotonic()`."""
        ...

    @property
    def started_ns(self) -> int:
        """The same as `time.time_ns()`, for spans."""
        ...

    def abandon(self) -> None:
        """Cut the request and free its connection; nothing once `answer` has taken it."""
        ...


class Answerer(Protocol):
    """Streams the answer to a conversation whose last line is the question: the text to
    `on_text`, everything else as events, each in its place (text that comes before an event
    is given to `on_text` before the event is yielded)."""

    @property
    def model(self) -> str: ...

    def start_early(self, conversation: Sequence[ChatLine]) -> EarlyCall | None:
        """Send the first request for `conversation` now, if this answerer has one to send
        and can; the caller passes the result to `answer` or abandons it."""
        ...

    def answer(
        self, conversation: Sequence[ChatLine], on_text: TextSink, early: EarlyCall | None = None
    ) -> AsyncIterator[AnswerEvent]: ...

    async def aclose(self) -> None: ...
