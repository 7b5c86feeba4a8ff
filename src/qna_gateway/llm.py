"""The OpenAI-compatible answerer: streamed chat completions with a knowledge-base tool loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2
import msgspec
import openai
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .answers import (
    Answerer,
    AnswerError,
    AnswerEvent,
    ChatLine,
    EarlyCall,
    Finished,
    TextSink,
    ToolCalled,
    ToolResult,
    UsageReported,
)
from .extractive import ExtractiveAnswerer
from .kb import KnowledgeBase
from .llm_client import OPENAI_DEFAULT_BASE_URL, make_client
from .schemas import Usage
from .settings import Settings
from .telemetry import GenAI, Telemetry, exemplar_of
from .tools import SEARCH_TOOL, SEARCH_TOOL_NAME, passages_for_model, traced_tool_run
from .upstream_http import body_follower, raw_reader

# Join a round's text pieces into one string every this many.
COMPACT_PARTS = 64

# How long to wait for the end of a body after [DONE] before giving its connection up.
FINISH_READING_SECONDS = 2.0

# On an LLM call's span: "used" or "abandoned" when it was sent before the question was stored.
EARLY_CALL = "qna.early_call"

PREFETCH_NOTE = (
    "Passages from the knowledge base that may answer the question (cite their documents):\n"
)


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _ChunkUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    """The parts of a chat.completion.chunk the gateway reads (unknown fields ignored)."""

    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _ChunkUsage | None = None
    model: str | None = None
    error: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_encode_json = msgspec.json.Encoder().encode


@dataclass
class _PartialCall:
    """A tool call assembled from streamed deltas (id and name first, arguments in pieces)."""

    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Round:
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage | None = None
    model: str | None = None
    first_chunk_at: float | None = None


class OpenAIAnswerer:
    """Any OpenAI-compatible chat-completions endpoint, through one reused AsyncOpenAI client.

    The client retries connection errors, 408/409/429 and 5xx (with backoff, honouring
    Retry-After) before a stream starts; once text has flowed nothing is retried, since it
    already went out to the clients. With `QNA_KB_MODE=tools` the model gets the search tool
    for up to `QNA_KB_MAX_ROUNDS` rounds; with `prefetch` the passages are found first and
    given to it in the prompt (for models without tool support).
    """

    def __init__(self, settings: Settings, kb: KnowledgeBase, telemetry: Telemetry) -> None:
        self._settings = settings
        self._kb = kb
        self._telemetry = telemetry
        self._provider = provider_name(settings.openai_base_url)
        self._client = make_client(settings)
        self._breaker = CircuitBreaker(
            failures=settings.llm_breaker_failures, cooldown=settings.llm_breaker_seconds
        )

    @property
    def model(self) -> str:
        return self._settings.model

    async def aclose(self) -> None:
        await self._client.close()

    def start_early(self, conversation: Sequence[ChatLine]) -> EarlyCall | None:
        settings = self._settings
        if settings.kb_mode == "prefetch":
            return None  # its first request waits for a search
        if self._breaker.open:
            # Open, the answer will say why; half-open, its trial call must be one whose
            # outcome is reported, and an early call may yet be abandoned.
            return None
        body = self._request_body(_messages_of(conversation), offer_tool=self._max_rounds > 0)
        request = self._client.stream("/chat/completions", _encode_json(body))
        return _EarlyCall(conversation, request, on_abandon=self._abandoned)

    def _abandoned(self, started_ns: int) -> None:
        """An abandoned early call still went out: its span, in the ask's trace."""
        self._telemetry.metrics.llm_early_starts.labels("abandoned").inc()
        span = self._call_span(started_ns)
        span.set_attribute(EARLY_CALL, "abandoned")
        span.end()

    def _call_span(self, start_time: int | None) -> Span:
        model = self._settings.model
        return self._telemetry.tracer.start_span(
            f"chat {model}",
            kind=SpanKind.CLIENT,
            attributes={
                GenAI.OPERATION: "chat",
                GenAI.PROVIDER: self._provider,
                GenAI.REQUEST_MODEL: model,
            },
            start_time=start_time,
        )

    @property
    def _max_rounds(self) -> int:
        return self._settings.kb_max_rounds if self._settings.kb_mode == "tools" else 0

    async def answer(
        self, conversation: Sequence[ChatLine], on_text: TextSink, early: EarlyCall | None = None
    ) -> AsyncIterator[AnswerEvent]:
        deadline = time.monotonic() + self._settings.llm_total_timeout_seconds
        assert early is None or isinstance(early, _EarlyCall)
        async for event in self._answer(conversation, on_text, deadline, early):
            yield event

    async def _answer(
        self,
        conversation: Sequence[ChatLine],
        on_text: TextSink,
        deadline: float,
        early: _EarlyCall | None,
    ) -> AsyncIterator[AnswerEvent]:
        messages = _messages_of(conversation)
        mode = self._settings.kb_mode
        if mode == "prefetch" and conversation:
            question = conversation[-1].content
            yield ToolCalled("prefetch", SEARCH_TOOL_NAME, json.dumps({"query": question}))
            hits = await self._kb.search(question, limit=self._settings.kb_top_k)
            yield ToolResult("prefetch", [hit.source for hit in hits])
            messages.insert(
                -1, {"role": "system", "content": PREFETCH_NOTE + passages_for_model(hits)}
            )
        total_in = total_out = 0
        max_rounds = self._max_rounds
        for round_number in range(max_rounds + 1):
            # The last round offers no tool, so the model has to answer with what it found.
            offer_tool = round_number < max_rounds
            result = _Round()
            await self._one_round(messages, offer_tool, result, on_text, deadline, early)
            early = None
            if result.usage is not None:
                total_in += result.usage.input_tokens
                total_out += result.usage.output_tokens
            calls = [result.calls[i] for i in sorted(result.calls)]
            if not calls:
                if total_in or total_out:
                    yield UsageReported(Usage(input_tokens=total_in, output_tokens=total_out))
                yield Finished(result.finish_reason or "stop")
                return
            messages.append(
                {
                    "role": "assistant",
                    "content": "".join(result.text) or None,
                    "tool_calls": [
                        {
                            "id": call.call_id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": "".join(call.arguments)},
                        }
                        for call in calls
                    ],
                }
            )
            for call in calls:
                arguments = "".join(call.arguments)
                yield ToolCalled(call.call_id, call.name, arguments)
                outcome = await traced_tool_run(
                    self._telemetry,
                    self._kb,
                    call.call_id,
                    call.name,
                    arguments,
                    limit=self._settings.kb_top_k,
                )
                yield ToolResult(call.call_id, outcome.sources, outcome.error)
                messages.append(
                    {"role": "tool", "tool_call_id": call.call_id, "content": outcome.content}
                )
        raise AnswerError("The model kept calling tools and never answered.")

    async def _one_round(
        self,
        messages: list[dict[str, Any]],
        offer_tool: bool,
        result: _Round,
        on_text: TextSink,
        deadline: float,
        early: _EarlyCall | None,
    ) -> None:
        """One chat-completions call, in a CLIENT span with the GenAI attributes; `early`,
        if given, is this call already sent (the span starts when it was).

        The span is started, not made current: the text goes out from the connection's
        callback, and what runs there must not see this span as its own.
        """
        span = self._call_span(early.started_ns if early else None)
        if early is not None:
            span.set_attribute(EARLY_CALL, "used")
            self._telemetry.metrics.llm_early_starts.labels("used").inc()
        started = early.started if early else time.monotonic()
        failure: str | None = None
        try:
            if early is None:  # an early call passed the check when it was sent
                self._breaker.check()
            await self._stream_round(messages, offer_tool, result, on_text, deadline, early)
            self._breaker.succeeded()
        except AnswerError as exc:
            failure = exc.kind
            if exc.kind != "circuit_open":
                self._breaker.failed()
            raise
        except asyncio.CancelledError:
            failure = "cancelled"
            raise
        except Exception as exc:
            # The gateway's own failure (the text sink's, say): an error of the call, not one
            # the breaker holds against the LLM.
            failure = type(exc).__name__
            raise
        finally:
            elapsed = time.monotonic() - started
            if result.model:
                span.set_attribute(GenAI.RESPONSE_MODEL, result.model)
            if result.usage is not None:
                span.set_attribute(GenAI.INPUT_TOKENS, result.usage.input_tokens)
                span.set_attribute(GenAI.OUTPUT_TOKENS, result.usage.output_tokens)
            if result.finish_reason:
                span.set_attribute(GenAI.FINISH_REASONS, [result.finish_reason])
            if result.first_chunk_at is not None:
                span.set_attribute(GenAI.TIME_TO_FIRST_CHUNK, result.first_chunk_at - started)
            if failure is not None:
                span.set_attribute(GenAI.ERROR_TYPE, failure)
                span.set_status(Status(StatusCode.ERROR, failure))
            metrics = self._telemetry.metrics
            metrics.llm_calls.labels("error" if failure else "success").inc()
            metrics.llm_duration.observe(elapsed, exemplar_of(span.get_span_context()))
            span.end()

    def _request_body(self, messages: list[dict[str, Any]], offer_tool: bool) -> dict[str, Any]:
        """The chat-completions request, built here rather than through the SDK's typed
        `create()`, whose per-call walk over the parameters was a third of an ask's CPU
        (bench/results/profile-ask.md). The client still sends it: base URL, auth, retries,
        status errors."""
        body: dict[str, Any] = {
            "model": self._settings.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self._settings.kb_mode == "tools":
            # Once tool messages are in the conversation the tool must stay declared;
            # tool_choice="none" is how the last round forbids another call.
            body["tools"] = [SEARCH_TOOL]
            body["tool_choice"] = "auto" if offer_tool else "none"
        return body

    async def _stream_round(
        self,
        messages: list[dict[str, Any]],
        offer_tool: bool,
        result: _Round,
        on_text: TextSink,
        deadline: float,
        early: _EarlyCall | None,
    ) -> None:
        settings = self._settings
        started = early.started if early else time.monotonic()
        reader: _RoundReader | None = None
        try:
            async with _limit(settings.llm_first_token_timeout_seconds, deadline, "first_token"):
                if early is not None:
                    response = await early.response()
                else:
                    response = await self._client.stream(
                        "/chat/completions",
                        # Encoded here: the SDK's json.dumps of a long history costs several
                        # times msgspec's. Content-Type stays the SDK's default, JSON.
                        _encode_json(self._request_body(messages, offer_tool)),
                    )
            watchdog = _Watchdog(
                first_token=settings.llm_first_token_timeout_seconds,
                idle=settings.llm_idle_timeout_seconds,
                started=started,
                deadline=deadline,
            )
            reader = _RoundReader(result, on_text, watchdog)
            # What the reader leaves after [DONE] is read with `read` (one iterator per body).
            read = raw_reader(response)
            try:
                follow = body_follower(response)
                try:
                    if follow is not None:
                        # Each piece is parsed and its text sent on from the connection's
                        # callback as it arrives; this task wakes at the round's end.
                        await follow(reader.feed)
                    else:
                        while (data := await read()) and not reader.feed(data):
                            pass
                except asyncio.CancelledError:
                    watchdog.raise_if_expired()
                    raise
            finally:
                watchdog.close()
                if reader.done:
                    # The body's end usually follows [DONE] at once; read it in the background
                    # so the connection goes back to the pool without holding up the answer.
                    task = asyncio.create_task(_finish_reading(read, response))
                    _finishing.add(task)
                    task.add_done_callback(_finishing.discard)
                else:
                    await response.aclose()
        except openai.APITimeoutError as exc:
            if type(exc.__cause__).__name__ == "ConnectTimeout":
                raise AnswerError(
                    "Connecting to the LLM timed out.",
                    timeout=True,
                    kind="upstream_connect_timeout",
                ) from None
            raise AnswerError(
                "The LLM stopped sending.", timeout=True, kind="upstream_idle_timeout"
            ) from None
        # Before the stream the SDK raises its own errors; once it flows, the raw stream's
        # httpx2 errors and the chunk decoder's come through as they are.
        except httpx2.TimeoutException:
            raise AnswerError(
                "The LLM stopped sending.", timeout=True, kind="upstream_idle_timeout"
            ) from None
        except (httpx2.TransportError, openai.APIConnectionError) as exc:
            raise AnswerError(
                f"The connection to the LLM failed: {_short(str(exc))}", kind="connection"
            ) from None
        except openai.APIStatusError as exc:
            raise AnswerError(
                f"The LLM answered HTTP {exc.status_code}: {_short(exc.message)}",
                kind=str(exc.status_code),
            ) from None
        except openai.APIError as exc:
            raise AnswerError(
                f"The LLM's stream broke: {_short(str(exc))}", kind=type(exc).__name__
            ) from None
        except ValueError as exc:
            # Anything the transport could not decode on the way (chunks are decoded in the
            # reader, which turns a bad one into an AnswerError itself).
            raise _malformed(exc) from None
        if reader is not None and reader.error is not None:
            # Raised here, past the mapping above: what the LLM sent wrong is an AnswerError
            # already, and anything else came from the text sink, i.e. from this process
            # (a bug to log as one, not "a malformed chunk").
            raise reader.error
        for index, call in result.calls.items():
            call.call_id = call.call_id or f"call_{index}"


_finishing: set[asyncio.Task[None]] = set()


def _messages_of(conversation: Sequence[ChatLine]) -> list[dict[str, Any]]:
    return [{"role": line.role, "content": line.content} for line in conversation]


class _EarlyCall:
    """A first round's request, sent from a task of its own while the ask's statement runs."""

    def __init__(
        self,
        conversation: Sequence[ChatLine],
        request: Coroutine[Any, Any, httpx2.Response],
        *,
        on_abandon: Callable[[int], None],
    ) -> None:
        self._conversation = tuple(conversation)
        self._started = time.monotonic()
        self._started_ns = time.time_ns()
        self._task = asyncio.create_task(request, name="qna-early-llm-call")
        self._taken = False
        self._on_abandon = on_abandon

    @property
    def conversation(self) -> Sequence[ChatLine]:
        return self._conversation

    @property
    def started(self) -> float:
        return self._started

    @property
    def started_ns(self) -> int:
        return self._started_ns

    def abandon(self) -> None:
        if not self._taken:
            self._taken = True
            _discard(self._task)
            self._on_abandon(self._started_ns)

    async def response(self) -> httpx2.Response:
        self._taken = True
        try:
            return await self._task
        except asyncio.CancelledError:
            _discard(self._task)  # it may have finished as this task was cancelled
            raise


def _discard(task: asyncio.Task[httpx2.Response]) -> None:
    """Stop `task`; a response it got anyway is closed, an error it raised is dropped."""

    def close(done: asyncio.Task[httpx2.Response]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        closing = asyncio.create_task(done.result().aclose())
        _finishing.add(closing)
        closing.add_done_callback(_finishing.discard)

    task.cancel()
    task.add_done_callback(close)


async def _finish_reading(read: Callable[[], Awaitable[bytes]], response: httpx2.Response) -> None:
    """Read what follows [DONE] to the body's end, then release the response: closing it
    unread would close its connection too, and the next ask would pay for a new one."""
    try:
        # The answer is complete: a failure here only costs the connection.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(FINISH_READING_SECONDS):
                while await read():
                    pass
    finally:
        with contextlib.suppress(Exception):
            await response.aclose()


class DataLines:
    """Splits a byte stream of SSE into the payloads of its `data:` lines, one per chunk (the
    OpenAI protocol never spreads a chunk over several `data:` lines)."""

    def __init__(self) -> None:
        self.rest = b""  # a line not ended yet

    def feed(self, data: bytes) -> list[bytes]:
        if b"\r" in data:  # CRLF or CR line ends; a CRLF split between reads only adds a
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # blank line
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        # Blank separators, comments and `event:` lines carry nothing here.
        return [line[5:].strip() for line in lines if line.startswith(b"data:")]


class _RoundReader:
    """Reads one round's body: folds each chunk into the round and hands its text on."""

    def __init__(self, result: _Round, on_text: TextSink, watchdog: _Watchdog) -> None:
        self._result = result
        self._on_text = on_text
        self._watchdog = watchdog
        self._lines = DataLines()
        self.done = False  # [DONE] came
        self.error: BaseException | None = None

    def feed(self, data: bytes) -> bool:
        """Take the next piece of the body; True once the round needs nothing more (it is
        done, or failed: `error`). Never raises: it may run in the connection's callback."""
        result = self._result
        lines = self._lines
        try:
            payloads: Sequence[bytes]
            if (
                not lines.rest
                and data.startswith(b"data:")
                and data.endswith(b"\n\n")
                and data.find(b"\n") == len(data) - 2
            ):
                # One whole chunk in one read, the usual case: split here, two calls fewer
                # per token than DataLines' general path.
                payloads = (data[5:-2].strip(),)
            else:
                payloads = lines.feed(data)
            for payload in payloads:
                if payload == b"[DONE]":
                    self.done = True
                    return True
                try:
                    chunk = _chunk_decoder.decode(payload)
                except msgspec.DecodeError as exc:
                    raise _malformed(exc) from None
                _read_chunk(chunk, result, self._on_text)
        except Exception as exc:
            self.error = exc
            return True
        self._watchdog.progress(waiting_first=not result.text and not result.calls)
        return False


def _read_chunk(chunk: _Chunk, result: _Round, on_text: TextSink) -> None:
    """Fold one chunk into the round; its text goes to `on_text` as it is."""
    if chunk.error is not None:
        raise AnswerError(
            f"The LLM reported an error mid-stream: {_short(str(chunk.error))}",
            kind="stream_error",
        )
    if result.first_chunk_at is None:
        result.first_chunk_at = time.monotonic()
    result.model = result.model or chunk.model
    if chunk.usage is not None:
        result.usage = Usage(
            input_tokens=chunk.usage.prompt_tokens, output_tokens=chunk.usage.completion_tokens
        )
    for choice in chunk.choices:
        delta = choice.delta
        if delta.content:
            text = result.text
            text.append(delta.content)
            if len(text) >= COMPACT_PARTS:
                # A round keeps its text for a tool call's message; kept as a few strings,
                # not one object per token, it costs a stream a few KB less.
                text[:] = ["".join(text)]
            on_text(delta.content)
        for piece in delta.tool_calls or ():
            call = result.calls.setdefault(piece.index, _PartialCall())
            if piece.id:
                call.call_id = piece.id
            if piece.function is not None:
                if piece.function.name:
                    call.name += piece.function.name
                if piece.function.arguments:
                    call.arguments.append(piece.function.arguments)
        if choice.finish_reason is not None:
            result.finish_reason = choice.finish_reason


_TIMEOUT_TEXT = {
    "first_token": ("The LLM sent no first token in time.", "upstream_first_token_timeout"),
    "idle": ("The LLM stopped sending in the middle of the answer.", "upstream_idle_timeout"),
    "total": ("The answer took longer than the total time allowed.", "upstream_total_timeout"),
}


@contextlib.asynccontextmanager
async def _limit(seconds: float, deadline: float, which: str) -> AsyncIterator[None]:
    """A timeout of `seconds`, or less when the total deadline comes first, that ends the
    answer with the reason of whichever limit it was."""
    remaining = deadline - time.monotonic()
    if remaining < seconds:
        seconds, which = max(remaining, 0.0), "total"
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        text, kind = _TIMEOUT_TEXT[which]
        raise AnswerError(text, timeout=True, kind=kind) from None


class _Watchdog:
    """The first-token, idle and total limits of one stream, kept by one timer that re-arms
    itself, instead of a timeout set and cleared around every read.

    Until the first text or tool call the first-token limit runs from the request (role-only
    chunks do not count); after it, the idle limit runs from the last piece of the body. The
    reading task is cancelled when one runs out.
    """

    def __init__(self, *, first_token: float, idle: float, started: float, deadline: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        # `started` and `deadline` are on time.monotonic(); the loop's clock may differ
        # (uvloop's is coarse).
        now = self._loop.time()
        offset = now - time.monotonic()
        self._first_due = started + offset + first_token
        self._idle = idle
        self._deadline = deadline + offset
        self._waiting_first = True
        self._last = now
        self._expired: str | None = None
        self._handle = self._loop.call_at(self._due()[0], self._check)

    def progress(self, *, waiting_first: bool) -> None:
        """A piece of the body came; `waiting_first` while it held no text or tool call yet."""
        self._last = self._loop.time()
        if self._waiting_first and not waiting_first:
            # The first token came: from now on the idle limit, which may come sooner.
            self._waiting_first = False
            self._handle.cancel()
            self._handle = self._loop.call_at(self._due()[0], self._check)

    def _due(self) -> tuple[float, str]:
        if self._waiting_first:
            when, which = self._first_due, "first_token"
        else:
            when, which = self._last + self._idle, "idle"
        return (self._deadline, "total") if self._deadline <= when else (when, which)

    def _check(self) -> None:
        when, which = self._due()
        if when <= self._loop.time():
            self._expired = which
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(max(when, self._loop.time() + 0.01), self._check)

    def raise_if_expired(self) -> None:
        """In the read's CancelledError handler: our own cancel becomes the limit's error."""
        if self._expired is not None and self._task.uncancel() == 0:
            text, kind = _TIMEOUT_TEXT[self._expired]
            self._expired = None
            raise AnswerError(text, timeout=True, kind=kind) from None

    def close(self) -> None:
        self._handle.cancel()


class CircuitBreaker:
    """After `failures` failed calls in a row, fail fast for `cooldown` seconds, then let one
    call through: its success closes the breaker, its failure opens it again."""

    def __init__(self, *, failures: int, cooldown: float) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._failures = 0
        self._open_until = 0.0

    def check(self) -> None:
        if self._threshold <= 0 or self._failures < self._threshold:
            return
        now = time.monotonic()
        if now < self._open_until:
            raise AnswerError(
                f"The LLM failed {self._failures} times in a row; not calling it for another "
                f"{self._open_until - now:.0f}s.",
                kind="circuit_open",
            )
        # Half-open: this call is the trial; a failure re-opens for a full cooldown.
        self._open_until = now + self._cooldown

    def succeeded(self) -> None:
        self._failures = 0
        self._open_until = 0.0

    def failed(self) -> None:
        self._failures += 1
        if self._threshold > 0 and self._failures >= self._threshold:
            self._open_until = time.monotonic() + self._cooldown

    @property
    def open(self) -> bool:
        return self._threshold > 0 and self._failures >= self._threshold


def _malformed(exc: Exception) -> AnswerError:
    return AnswerError(
        f"The LLM sent a malformed chunk: {_short(str(exc))}", kind="malformed_chunk"
    )


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def provider_name(base_url: str | None) -> str:
    """gen_ai.provider.name from the endpoint: well-known hosts by name, else "openai"
    (the protocol spoken)."""
    host = urlsplit(base_url or OPENAI_DEFAULT_BASE_URL).hostname or ""
    for marker, name in (("openrouter", "openrouter"), ("azure", "azure.ai.openai")):
        if marker in host:
            return name
    return "openai"


def make_answerer(settings: Settings, kb: KnowledgeBase, telemetry: Telemetry) -> Answerer:
    if settings.llm_configured:
        return OpenAIAnswerer(settings, kb, telemetry)
    return ExtractiveAnswerer(kb, telemetry, top_k=min(settings.kb_top_k, 3))
