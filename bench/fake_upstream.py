"""Scriptable fake OpenAI chat-completions server: the tests' upstream, the benchmarks' floor."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import random
import re
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Generator, Mapping, MutableMapping, Sequence
from types import FrameType, TracebackType
from typing import Annotated, Any, Final, Literal, Self, TypeVar

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = [
    "DEFAULT_MODEL",
    "PACED",
    "ZERO",
    "FakeUpstream",
    "FakeUpstreamApp",
    "Scenario",
    "ToolCall",
    "answer_text",
    "answer_tokens",
    "directive",
    "main",
    "scenario_with",
]

_T = TypeVar("_T")

# Plain ASGI types: no framework, so the per-chunk path is one dict and one transport write.
ASGIScope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[ASGIMessage]]
ASGISend = Callable[[ASGIMessage], Awaitable[None]]

DEFAULT_MODEL: Final = "fake-model"
# The CLI collects garbage only while no request is in flight (see _Server.collect_when_idle),
# or, under load that never pauses, once this many tracked objects are pending: a bound on
# memory that a benchmark window (minutes, a few dozen objects a stream) never reaches.
BUSY_COLLECTION_AFTER: Final = 1_000_000

Fault = Literal["none", "http_429", "http_500", "cut", "malformed", "stall"]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]


class ToolCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One function call the fake model makes; `arguments` is sent verbatim, valid JSON or not."""

    name: str
    arguments: str = "{}"
    # Empty means "call_fake_<round>_<index>", stable so tests can answer it by id.
    id: str = ""


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the fake model behaves for one request (times in ms unless named otherwise).

    Jitters are uniform in ±value. `fault_after` counts content tokens (argument pieces for tool
    calls); cut/malformed/stall fire there, or before the finish chunk if that is past the end.
    """

    ttft_ms: NonNegative = 0.0
    ttft_jitter_ms: NonNegative = 0.0
    # 0 means no pacing at all (gap_jitter_ms is then ignored): the benchmark floor.
    tokens_per_second: NonNegative = 0.0
    gap_jitter_ms: NonNegative = 0.0
    tokens: Count = 16
    text: str = ""
    fault: Fault = "none"
    fault_after: Count = 0
    stall_seconds: NonNegative = 1.0
    # Apply `fault` to the first N requests of this exact scenario only; 0 = every request.
    fault_times: Count = 0
    tool_calls: tuple[ToolCall, ...] = ()
    tool_rounds: tuple[tuple[ToolCall, ...], ...] = ()
    seed: int | None = None
    # Send the stream gzip-encoded, flushed per chunk (as some proxies in front of LLMs do).
    gzip: bool = False


# Presets shared by the CLI and benchmarks; PACED matches the numbers in the shared notes.
PACED: Final = Scenario(
    ttft_ms=300, ttft_jitter_ms=100, tokens_per_second=40, gap_jitter_ms=10, tokens=300
)
ZERO: Final = Scenario(tokens=300)


def scenario_with(base: Scenario, fields: Mapping[str, Any]) -> Scenario:
    """`base` with `fields` overridden, validated like the JSON API (raises msgspec errors)."""
    # Round-trip through builtins so values get the same validation as a JSON body would.
    data: dict[str, Any] = msgspec.to_builtins(base)
    data.update(msgspec.to_builtins(dict(fields)))
    return msgspec.convert(data, Scenario)


def directive(**fields: Any) -> str:
    """The `[[fake:{...}]]` text that scripts the upstream from inside a user message."""
    scenario_with(Scenario(), fields)  # fail in the test, not as a 400 deep in the gateway
    return "[[fake:" + msgspec.json.encode(fields).decode() + "]]"


@functools.lru_cache(maxsize=64)
def _tokens(text: str, count: int) -> tuple[str, ...]:
    if not text:
        return tuple(f" word{i}" for i in range(1, count + 1))
    # Words keep their leading whitespace, and trailing whitespace joins the last word, so
    # "".join(tokens) == text always holds.
    tokens = re.findall(r"\s*\S+", text)
    if not tokens:
        return (text,)
    rest = len(text) - sum(map(len, tokens))
    if rest:
        tokens[-1] += text[-rest:]
    return tuple(tokens)


def answer_tokens(scenario: Scenario) -> list[str]:
    """The content tokens a text answer streams, in order (`text`, or `tokens` generated words)."""
    return list(_tokens(scenario.text, scenario.tokens))


def answer_text(scenario: Scenario) -> str:
    """The full text answer for `scenario`."""
    return "".join(_tokens(scenario.text, scenario.tokens))


@functools.lru_cache(maxsize=64)
def _encoded_tokens(text: str, count: int) -> tuple[bytes, ...]:
    # JSON-encode each token once per distinct answer; the hot loop only concatenates bytes.
    return tuple(msgspec.json.encode(t) for t in _tokens(text, count))


_ARGUMENT_PIECE: Final = 5  # characters per streamed arguments delta, so they arrive in pieces


def _call_id(call: ToolCall, round_: int, index: int) -> str:
    return call.id or f"call_fake_{round_}_{index}"


@functools.lru_cache(maxsize=64)
def _tool_deltas(calls: tuple[ToolCall, ...], round_: int) -> tuple[bytes, ...]:
    """Delta objects streaming `calls` the way OpenAI does: a header, then argument pieces."""
    enc = msgspec.json.encode
    out: list[bytes] = []
    for index, call in enumerate(calls):
        header: dict[str, Any] = {
            "index": index,
            "id": _call_id(call, round_, index),
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        # OpenAI folds the role into the first tool-call delta, with content null.
        first: dict[str, Any] = {"role": "assistant", "content": None} if index == 0 else {}
        out.append(enc({**first, "tool_calls": [header]}))
        args = call.arguments
        for start in range(0, len(args), _ARGUMENT_PIECE):
            piece = {
                "index": index,
                "function": {"arguments": args[start : start + _ARGUMENT_PIECE]},
            }
            out.append(enc({"tool_calls": [piece]}))
    return tuple(out)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        parts = (p.get("text") for p in content if isinstance(p, dict))
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


_DIRECTIVE: Final = "[[fake:"
_JSON = json.JSONDecoder()


def _directive_fields(messages: Sequence[Any]) -> dict[str, Any] | None:
    """The JSON object of a `[[fake:{...}]]` directive in the last user message, if any."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            text = _content_text(message.get("content"))
            break
    else:
        return None
    start = text.find(_DIRECTIVE)
    if start < 0:
        return None
    # raw_decode finds where the object ends, so "]]" inside it (tool_rounds) is harmless.
    try:
        fields, end = _JSON.raw_decode(text, start + len(_DIRECTIVE))
    except json.JSONDecodeError as exc:
        raise ValueError(f"directive is not JSON: {exc}") from None
    if not isinstance(fields, dict) or not text.startswith("]]", end):
        raise ValueError("directive must be [[fake:{...}]]")
    return fields


def _tool_round(messages: Sequence[Any]) -> int:
    """How many tool-result rounds the conversation holds (runs of role "tool" messages)."""
    rounds = 0
    previous = False
    for message in messages:
        is_tool = isinstance(message, dict) and message.get("role") == "tool"
        if is_tool and not previous:
            rounds += 1
        previous = is_tool
    return rounds


def _prompt_tokens(messages: Sequence[Any]) -> int:
    # A rough, deterministic stand-in for a tokenizer: words plus a little per-message overhead.
    words = sum(
        len(_content_text(m.get("content")).split()) + 4 for m in messages if isinstance(m, dict)
    )
    return words + 2


# Seeding a Random from the OS costs ~20 us, so unseeded scenarios share this one.
_SHARED_RNG: Final = random.Random()


def _rng(seed: int | None) -> random.Random:
    return _SHARED_RNG if seed is None else random.Random(seed)


def _jittered(base_ms: float, jitter_ms: float, rng: random.Random) -> float:
    value = base_ms + rng.uniform(-jitter_ms, jitter_ms) if jitter_ms else base_ms
    return max(0.0, value) / 1000


class _Abort(Exception):
    """Raised on purpose so uvicorn drops the socket mid-body (no chunked terminator)."""


_LOG: Final = logging.getLogger("bench.fake_upstream")
# uvicorn compares `logger.level` (not the effective level) with TRACE on every connection
# and, at NOTSET, makes a trace log call each time; a real level skips that.
_LOG.setLevel(logging.INFO)


class _DropDeliberateAborts(logging.Filter):
    """uvicorn logs every app exception with a traceback; a scripted cut is not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _Abort)


_LOG.addFilter(_DropDeliberateAborts())


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, logging to our own logger and with no access log.

    Setting these per protocol (not through uvicorn's logging config) leaves the process-wide
    `uvicorn.*` loggers alone, which matters when the gateway runs in the same test process.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _LOG
        self.access_log = False


class _Stats:
    __slots__ = (
        "aborted",
        "active",
        "chunks",
        "clients",
        "completed",
        "connections",
        "disconnects",
        "faults",
        "last_headers",
        "last_request",
        "requests",
        "streams",
    )

    def __init__(self) -> None:
        self.requests = 0  # chat-completion requests received, valid or not
        self.connections = 0  # distinct client connections those came on (reuse shows here)
        self.clients: set[tuple[str, int]] = set()
        self.streams = 0  # streaming responses started
        self.completed = 0  # responses finished normally ([DONE] for streams)
        self.chunks = 0  # chat.completion.chunk events sent
        self.disconnects = 0  # clients that went away before the end
        self.aborted = 0  # connections dropped on purpose ("cut", or stopping)
        self.active = 0  # chat-completion requests in flight now
        self.faults: dict[str, int] = dict.fromkeys(
            ("http_429", "http_500", "cut", "malformed", "stall"), 0
        )
        self.last_request: Any = None
        self.last_headers: dict[str, str] = {}

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__slots__ if name != "clients"}
        out["faults"] = dict(self.faults)
        out["last_headers"] = dict(self.last_headers)
        return out


@dataclasses.dataclass(slots=True)
class _Plan:
    scenario: Scenario
    fault: Fault
    model: str
    calls: tuple[ToolCall, ...]
    round: int
    include_usage: bool
    prompt_tokens: int
    request_id: str


def _headers(content_type: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> list[Any]:
    return [(b"content-type", content_type), *extra]


_JSON_TYPE: Final = b"application/json"
_SSE_TYPE: Final = b"text/event-stream; charset=utf-8"


async def _send_json(
    send: ASGISend, status: int, payload: Any, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = msgspec.json.encode(payload)
    headers = _headers(_JSON_TYPE, [(b"content-length", b"%d" % len(body)), *extra])
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _gzipping(send: ASGISend) -> ASGISend:
    """`send` with the body gzip-encoded, each piece flushed so the stream still streams."""
    compressor = zlib.compressobj(wbits=31)  # 31: the gzip container

    async def gzip_send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [*message["headers"], (b"content-encoding", b"gzip")]
            message = {**message, "headers": headers}
        else:
            more = message.get("more_body", False)
            body = compressor.compress(message.get("body", b""))
            body += compressor.flush(zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
            message = {**message, "body": body}
        await send(message)

    return gzip_send


async def _send_error(
    send: ASGISend,
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    code: str | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    await _send_json(send, status, _error_body(message, kind, code), extra)


async def _read_body(receive: ASGIReceive) -> bytes | None:
    """The request body, or None when the client left before sending all of it."""
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body", False):
            return body


async def _watch_disconnect(receive: ASGIReceive, gone: asyncio.Event) -> None:
    # Once the body is read, uvicorn's receive() only returns when the client disconnects (or
    # the response completes); without this, send() after a disconnect is a silent no-op.
    await receive()
    gone.set()


async def _pause(gone: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early if the client disconnects; True if it did."""
    if seconds > 0 and not gone.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await gone.wait()
    return gone.is_set()


async def _carry_on(coro: Any, waiting: Any) -> None:
    """Await the rest of `coro`, which last yielded `waiting` (started with `send(None)`)."""
    await _Resume(coro, waiting)


class _Resume:
    """An awaitable that goes on with a coroutine already started: what the awaiting task
    sends or throws goes on to it, as `await` does for one not started. (qna_gateway/sse.py's
    `_carry_on` does the same; the harness imports nothing of the system it measures.)"""

    def __init__(self, coro: Any, waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting = self._coro, self._waiting
        while True:
            try:
                value = yield waiting
            except BaseException as exc:
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coro.send(value)
                except StopIteration:
                    return


class _Pacer:
    """One stream's `items` sent on the paced schedule (the same draws from `rng` as the loop
    in `FakeUpstreamApp._stream`) from timer callbacks, each running the server's send to its
    end unless it waits for the client: no task wakes per chunk, a third less CPU per chunk,
    which the benchmark's second core (this server and the load generator) is short of at 500
    streams. `run` says False if the client left first."""

    __slots__ = (
        "finished",
        "gone",
        "index",
        "items",
        "jitter",
        "loop",
        "next_at",
        "period",
        "post",
        "pre",
        "rng",
        "send",
        "sender",
        "stats",
        "timer",
    )

    def __init__(
        self,
        send: ASGISend,
        gone: asyncio.Event,
        stats: _Stats,
        pre: bytes,
        items: Sequence[bytes],
        post: bytes,
        period: float,
        jitter: float,
        rng: random.Random,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[bool] = self.loop.create_future()
        self.send = send
        self.gone = gone
        self.stats = stats
        self.pre = pre
        self.items = items
        self.post = post
        self.period = period
        self.jitter = jitter
        self.rng = rng
        self.index = 0
        self.next_at = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.sender: asyncio.Task[None] | None = None

    async def run(self) -> bool:
        self.tick()
        try:
            return await self.finished
        finally:
            if self.timer is not None:
                self.timer.cancel()
            if self.sender is not None:
                self.sender.cancel()
            # The timer and the sender's done callback hold bound methods of this pacer: left
            # set, they make a reference cycle that would keep the whole stream (its send,
            # request and transport) for the garbage collector, whose passes stall this
            # server for tens of ms at 500 streams. Cleared, it all goes when the stream ends.
            self.timer = self.sender = None

    def tick(self) -> None:
        if self.finished.done():
            return
        if self.gone.is_set():
            self.finished.set_result(False)
            return
        body = self.pre + self.items[self.index] + self.post
        self.index += 1
        pending = self.send({"type": "http.response.body", "body": body, "more_body": True})
        self.stats.chunks += 1
        try:
            waiting = pending.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            self.plan_next()
            return
        except BaseException as exc:
            self.finished.set_exception(exc)
            return
        # The transport's buffer is full: a task finishes this send, then the schedule goes
        # on (from the time it says, so a slow client gets the late chunks at once).
        self.sender = self.loop.create_task(_carry_on(pending, waiting))
        self.sender.add_done_callback(self.sent)

    def sent(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.finished.done():
            return
        exc = task.exception()
        if exc is not None:
            self.finished.set_exception(exc)
        else:
            self.plan_next()

    def plan_next(self) -> None:
        if self.index == len(self.items):
            self.finished.set_result(True)
            return
        jitter = self.jitter
        self.next_at += (
            max(0.0, self.period + self.rng.uniform(-jitter, jitter)) if jitter else self.period
        )
        self.timer = self.loop.call_at(self.next_at, self.tick)


class FakeUpstreamApp:
    """The raw ASGI application; `FakeUpstream` and the CLI serve it with uvicorn."""

    def __init__(self, scenario: Scenario | None = None, *, model: str = DEFAULT_MODEL) -> None:
        self.model = model
        self.initial = scenario if scenario is not None else Scenario()
        self.scenario = self.initial
        self.stats = _Stats()
        self.created = int(time.time())
        # fault_times bookkeeping, keyed by the whole effective scenario so a directive-scripted
        # "fail once" works across the retries that repeat the same question.
        self._fault_uses: dict[Scenario, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False  # set by abort_streams, cleared when a server starts
        self._sequence = 0
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/_scenario"): self._get_scenario,
            ("POST", "/_scenario"): self._set_scenario,
            ("DELETE", "/_scenario"): self._reset_scenario,
            ("GET", "/_stats"): self._get_stats,
            ("POST", "/_stats/reset"): self._reset_stats,
        }
        self._paths = {path for _, path in self._routes}

    # -- state changes; call them on the server's loop (FakeUpstream does) ---------------------

    def set_scenario(self, fields: Mapping[str, Any]) -> Scenario:
        """Make the start-up default with `fields` overridden the current default."""
        self.scenario = scenario_with(self.initial, fields)
        self._fault_uses.clear()
        return self.scenario

    def reset_scenario(self) -> Scenario:
        self.scenario = self.initial
        self._fault_uses.clear()
        return self.scenario

    def reset_stats(self) -> None:
        active = self.stats.active
        self.stats = _Stats()
        self.stats.active = active  # requests still in flight will decrement it
        self._fault_uses.clear()

    def abort_streams(self) -> None:
        """Drop every in-flight response: uvicorn would otherwise wait for paced streams."""
        self.stopping = True
        for task in self._tasks:
            task.cancel()

    # -- ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are disabled
            return
        method: str = scope["method"]
        path: str = scope["path"]
        handler = self._routes.get((method, path))
        if handler is not None:
            await handler(scope, receive, send)
        elif method == "GET" and path.startswith("/v1/models/"):
            await self._model(path.removeprefix("/v1/models/"), send)
        elif path in self._paths:
            await _send_error(send, 405, f"Method not allowed ({method} {path})")
        else:
            await _send_error(send, 404, f"Invalid URL ({method} {path})")

    async def _models(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        await _send_json(send, 200, {"object": "list", "data": [self._model_object()]})

    async def _model(self, name: str, send: ASGISend) -> None:
        if name == self.model:
            await _send_json(send, 200, self._model_object())
        else:
            message = f"The model '{name}' does not exist or you do not have access to it."
            await _send_error(send, 404, message, code="model_not_found")

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "fake"}

    async def _health(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        await _send_json(send, 200, {"status": "ok"})

    async def _get_scenario(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        await _send_json(send, 200, self.scenario)

    async def _set_scenario(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        try:
            fields = msgspec.json.decode(body, type=dict[str, Any]) if body.strip() else {}
            scenario = self.set_scenario(fields)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await _send_error(send, 400, f"Invalid scenario: {exc}")
            return
        await _send_json(send, 200, scenario)

    async def _reset_scenario(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        await _send_json(send, 200, self.reset_scenario())

    async def _get_stats(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        await _send_json(send, 200, self.stats.as_dict())

    async def _reset_stats(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        self.reset_stats()
        await _send_json(send, 200, self.stats.as_dict())

    # -- chat completions -----------------------------------------------------------------------

    async def _chat(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        body = await _read_body(receive)
        if body is None:
            return
        stats = self.stats
        stats.requests += 1
        client = scope.get("client")
        if client and tuple(client) not in stats.clients:
            stats.clients.add(tuple(client))
            stats.connections += 1
        stats.last_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            request = msgspec.json.decode(body)
        except msgspec.DecodeError:
            stats.last_request = None
            message = "We could not parse the JSON body of your request. (HINT: This likely means"
            message += " you aren't using your HTTP library correctly.)"
            await _send_error(send, 400, message)
            return
        stats.last_request = request
        plan = await self._plan(request, send)
        if plan is None:
            return
        if plan.fault == "http_429":
            message = "Rate limit reached for requests (fake upstream). Please try again."
            retry = [(b"retry-after", b"0")]
            await _send_error(send, 429, message, "requests", "rate_limit_exceeded", retry)
            return
        if plan.fault == "http_500":
            message = "The server had an error while processing your request. Sorry about that!"
            await _send_error(send, 500, message, "server_error")
            return

        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        self._tasks.add(task)
        stats.active += 1
        try:
            if request.get("stream") is True:
                await self._stream(_gzipping(send) if plan.scenario.gzip else send, gone, plan)
            else:
                await self._complete(send, gone, plan)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            # Our own shutdown: drop the socket quietly instead of a logged cancellation.
            self.stats.aborted += 1
            raise _Abort("fake upstream is stopping") from None
        finally:
            watcher.cancel()
            self._tasks.discard(task)
            self.stats.active -= 1

    async def _plan(self, request: Any, send: ASGISend) -> _Plan | None:
        """Validate the request and pick its scenario; sends the 400 itself and returns None."""
        if not isinstance(request, dict):
            await _send_error(send, 400, "The request body must be a JSON object.")
            return None
        model = request.get("model")
        if not isinstance(model, str) or not model:
            await _send_error(send, 400, "you must provide a model parameter")
            return None
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            message = "Missing required parameter: 'messages'."
            await _send_error(send, 400, message, code="missing_required_parameter")
            return None
        try:
            fields = _directive_fields(messages)
            scenario = self.scenario if fields is None else scenario_with(self.scenario, fields)
        except (ValueError, msgspec.ValidationError) as exc:
            await _send_error(send, 400, f"Invalid fake directive: {exc}")
            return None

        round_ = _tool_round(messages)
        rounds = scenario.tool_rounds or ((scenario.tool_calls,) if scenario.tool_calls else ())
        calls = rounds[round_] if round_ < len(rounds) else ()
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self._sequence += 1
        return _Plan(
            scenario=scenario,
            fault=self._take_fault(scenario),
            model=model,
            calls=calls,
            round=round_,
            include_usage=include_usage and request.get("stream") is True,
            prompt_tokens=_prompt_tokens(messages),
            request_id=f"{self._sequence:08d}",
        )

    def _take_fault(self, scenario: Scenario) -> Fault:
        fault = scenario.fault
        if fault == "none":
            return fault
        if scenario.fault_times:
            used = self._fault_uses.get(scenario, 0)
            if used >= scenario.fault_times:
                return "none"
            self._fault_uses[scenario] = used + 1
        self.stats.faults[fault] += 1
        return fault

    def _usage(self, plan: _Plan, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": plan.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": plan.prompt_tokens + completion_tokens,
        }

    async def _stream(self, send: ASGISend, gone: asyncio.Event, plan: _Plan) -> None:
        s = plan.scenario
        stats = self.stats
        stats.streams += 1
        headers = _headers(_SSE_TYPE, [(b"x-request-id", b"req_" + plan.request_id.encode())])
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        # Hand-built byte templates: a content chunk is pre + json(token) + post, nothing else.
        head = b'data: {"id":"chatcmpl-fake%s","object":"chat.completion.chunk","created":%d,' % (
            plan.request_id.encode(),
            int(time.time()),
        )
        head += b'"model":' + msgspec.json.encode(plan.model) + b',"choices":['
        usage_null = b',"usage":null' if plan.include_usage else b""
        tail = b',"logprobs":null,"finish_reason":null}]' + usage_null + b"}\n\n"
        items: Sequence[bytes]
        if plan.calls:
            pre = head + b'{"index":0,"delta":'
            post = tail
            items = _tool_deltas(plan.calls, plan.round)
            reason = b"tool_calls"
        else:
            pre = head + b'{"index":0,"delta":{"content":'
            post = b"}" + tail
            items = _encoded_tokens(s.text, s.tokens)
            reason = b"stop"

        rng = _rng(s.seed)
        if await _pause(gone, _jittered(s.ttft_ms, s.ttft_jitter_ms, rng)):
            stats.disconnects += 1
            return
        if not plan.calls:
            role = b'{"index":0,"delta":{"role":"assistant","content":""}'
            await send(
                {"type": "http.response.body", "body": head + role + tail, "more_body": True}
            )
            stats.chunks += 1

        fault = plan.fault
        count = len(items)
        # A fault point past the end still fires, just before the finish chunk.
        fault_at = min(s.fault_after, count) if fault in ("cut", "malformed", "stall") else -1
        period = 1.0 / s.tokens_per_second if s.tokens_per_second > 0 else 0.0
        jitter = s.gap_jitter_ms / 1000
        first = 0
        if fault_at < 0 and period:
            pacer = _Pacer(send, gone, stats, pre, items, post, period, jitter, rng)
            if not await pacer.run():
                stats.disconnects += 1
                return
            first = count  # all sent: on to the finish chunk
        clock = asyncio.get_running_loop().time
        # Pace against a schedule, not sleep-after-send, so the rate holds under load.
        next_at = clock()
        for i in range(first, count + 1):
            if i == fault_at:
                if fault == "cut":
                    stats.aborted += 1
                    raise _Abort("scripted cut")
                if fault == "malformed":
                    bad = b"data: {not json\n\n"
                    await send({"type": "http.response.body", "body": bad, "more_body": True})
                elif await _pause(gone, s.stall_seconds):  # stall
                    stats.disconnects += 1
                    return
                next_at = clock()
            if i == count:
                break
            if period and i:
                next_at += max(0.0, period + rng.uniform(-jitter, jitter)) if jitter else period
                delay = next_at - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            if gone.is_set():
                stats.disconnects += 1
                return
            await send(
                {"type": "http.response.body", "body": pre + items[i] + post, "more_body": True}
            )
            stats.chunks += 1

        final = head + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"' + reason + b'"}]'
        final += usage_null + b"}\n\n"
        if plan.include_usage:
            usage = msgspec.json.encode(self._usage(plan, count))
            final += head + b'],"usage":' + usage + b"}\n\n"
            stats.chunks += 1
        final += b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": final, "more_body": False})
        stats.chunks += 1
        stats.completed += 1

    async def _complete(self, send: ASGISend, gone: asyncio.Event, plan: _Plan) -> None:
        s = plan.scenario
        rng = _rng(s.seed)
        if plan.calls:
            count = len(_tool_deltas(plan.calls, plan.round))
            tool_calls = [
                {
                    "id": _call_id(call, plan.round, i),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for i, call in enumerate(plan.calls)
            ]
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": tool_calls,
                "refusal": None,
            }
            reason = "tool_calls"
        else:
            count = len(_tokens(s.text, s.tokens))
            message = {"role": "assistant", "content": answer_text(s), "refusal": None}
            reason = "stop"
        # The whole generation time passes before a non-streamed answer appears.
        delay = _jittered(s.ttft_ms, s.ttft_jitter_ms, rng)
        if s.tokens_per_second > 0:
            delay += max(0, count - 1) / s.tokens_per_second
        if plan.fault == "stall":
            delay += s.stall_seconds
        if await _pause(gone, delay):
            self.stats.disconnects += 1
            return
        payload = {
            "id": "chatcmpl-fake" + plan.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": plan.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            ],
            "usage": self._usage(plan, count),
        }
        body = b"{not json" if plan.fault == "malformed" else msgspec.json.encode(payload)
        extra = [
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", b"req_" + plan.request_id.encode()),
        ]
        await send(
            {"type": "http.response.start", "status": 200, "headers": _headers(_JSON_TYPE, extra)}
        )
        if plan.fault == "cut":
            half = body[: len(body) // 2]
            await send({"type": "http.response.body", "body": half, "more_body": True})
            self.stats.aborted += 1
            raise _Abort("scripted cut")
        await send({"type": "http.response.body", "body": body, "more_body": False})
        self.stats.completed += 1


# -- serving ------------------------------------------------------------------------------------


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _config(app: FakeUpstreamApp, *, quiet: bool) -> uvicorn.Config:
    # quiet: no log_config / log_level, because uvicorn applies those to the process-wide
    # `uvicorn.*` loggers, and the test process may be running the gateway's uvicorn too.
    logging_options: dict[str, Any] = (
        {"log_config": None, "log_level": None}
        if quiet
        else {"log_level": "warning", "access_log": False}
    )
    return uvicorn.Config(
        app,
        http=_Protocol,
        loop=_loop_name(),
        ws="none",  # importing a websockets backend can warn, and filterwarnings=error is on
        lifespan="off",
        interface="asgi3",
        proxy_headers=False,
        server_header=False,
        # Long keep-alive: a client reusing a connection the server just timed out gets a
        # spurious connection error, which would make retry tests flaky.
        timeout_keep_alive=75,
        timeout_graceful_shutdown=3,
        **logging_options,
    )


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; binding it ourselves is how port 0 gets a free port we can report."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def _root_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn.Server that stops promptly and can drop in-flight streams on the way out."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: FakeUpstreamApp,
        on_ready: Callable[[], None] | None = None,
        *,
        collect_when_idle: bool = False,
    ) -> None:
        super().__init__(config)
        self.app = app
        self.on_ready = on_ready
        # For the CLI, which is the benchmark's instrument: a collection stops every stream it
        # serves at once (tens of ms at 500 streams), and the figures would charge that to
        # whatever sits between it and the load generator. Not for the thread in a test
        # process: the collector is the process's, not this server's.
        self.collect_when_idle = collect_when_idle
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.app.stopping = False  # the app may be served again after a stop
        await super().startup(sockets=sockets)
        if self.collect_when_idle:
            gc.collect()
            gc.freeze()  # what start-up built stays: later collections need not walk it
            gc.disable()
        if self.on_ready is not None:
            self.on_ready()
        self.ready.set()

    async def main_loop(self) -> None:
        # uvicorn polls should_exit every 0.1 s; an event lets stop() return without that lag.
        # on_tick(0) also refreshes the Date header, so once a second is enough.
        assert self._wake is not None
        while not await self.on_tick(0):
            if self.collect_when_idle:
                pending = gc.get_count()[0]  # tracked objects made, less those freed
                if pending > BUSY_COLLECTION_AFTER or (pending and not self.app.stats.active):
                    gc.collect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()

    def request_stop(self) -> None:
        """Begin shutdown; call on the server's loop."""
        self.app.abort_streams()
        self.should_exit = True
        if self._wake is not None:
            self._wake.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # Paced streams would keep uvicorn's graceful shutdown waiting; drop them instead.
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.request_stop)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal after shutting down, so the CLI would die with status
        # -15; a benchmark harness is better served by a plain exit 0 after the graceful stop.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _loop_notifier() -> tuple[asyncio.Event, Callable[[], None]]:
    """An Event on the running loop, and a function any thread may call to set it."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()

    def notify() -> None:
        with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is waiting
            loop.call_soon_threadsafe(event.set)

    return event, notify


class FakeUpstream:
    """The fake upstream on 127.0.0.1:<free port>, served from a background thread.

    Use as `with FakeUpstream(tokens=5) as up:` or `async with ...`; point the OpenAI client at
    `up.base_url`. Keyword fields override the Scenario defaults for the start-up default.
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        model: str = DEFAULT_MODEL,
        host: str = "127.0.0.1",
        port: int = 0,
        **fields: Any,
    ) -> None:
        self.app = FakeUpstreamApp(scenario_with(scenario or Scenario(), fields), model=model)
        self.host = host
        self.port = port
        self.url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._on_exit: Callable[[], None] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI `base_url`: http://127.0.0.1:PORT/v1."""
        return self.url + "/v1"

    # -- lifecycle ------------------------------------------------------------------------------

    def _launch(self, notify: Callable[[], None] | None = None) -> _Server:
        if self._thread is not None:
            raise RuntimeError("FakeUpstream is already running")
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.url = _root_url(sock)
        server = _Server(_config(self.app, quiet=True), self.app, on_ready=notify)
        self._failure = None
        self._on_exit = notify

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # uvicorn reports start-up failure as SystemExit
                self._failure = exc
            finally:
                sock.close()
                server.ready.set()
                if self._on_exit is not None:
                    self._on_exit()

        self._server = server
        self._thread = threading.Thread(target=run, name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        return server

    def _check_started(self, server: _Server) -> None:
        if not server.started:
            self._join()
            raise RuntimeError(f"fake upstream failed to start: {self._failure!r}")

    def start(self) -> Self:
        """Start serving; returns once the server accepts connections."""
        server = self._launch()
        server.ready.wait(30)
        self._check_started(server)
        return self

    async def astart(self) -> Self:
        """`start` without blocking the caller's event loop while the thread boots."""
        event, notify = _loop_notifier()
        server = self._launch(notify)
        async with asyncio.timeout(30):
            await event.wait()
        self._check_started(server)
        return self

    def _request_stop(self) -> threading.Thread | None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return None
        if server.loop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed in the meantime
                server.loop.call_soon_threadsafe(server.request_stop)
        return thread

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join(30)
            if self._thread.is_alive():
                raise RuntimeError("fake upstream thread did not stop")
        self._thread = None
        self._server = None

    def stop(self) -> None:
        """Drop in-flight responses, stop the server and join its thread; idempotent."""
        if self._request_stop() is not None:
            self._join()

    async def astop(self) -> None:
        """`stop` that keeps the caller's loop running (its clients may need to read/close)."""
        event, notify = _loop_notifier()
        self._on_exit = notify  # set before asking, so the thread's exit cannot be missed
        thread = self._request_stop()
        if thread is None:
            return
        async with asyncio.timeout(30):
            while thread.is_alive():
                # The timeout covers a thread that read _on_exit just before we replaced it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await event.wait()
        self._join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # -- control (thread-safe: runs on the server's loop) ---------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        server = self._server
        loop = server.loop if server is not None else None
        if loop is None or self._thread is None or not self._thread.is_alive():
            return fn()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(10)

    @property
    def scenario(self) -> Scenario:
        """The current default scenario."""
        return self.app.scenario

    def set_scenario(self, **fields: Any) -> Scenario:
        """Set the default scenario to the start-up default with `fields` overridden."""
        return self._call(lambda: self.app.set_scenario(fields))

    def reset(self) -> None:
        """Back to the start-up scenario, with zeroed stats and fault counters."""

        def reset() -> None:
            self.app.reset_scenario()
            self.app.reset_stats()

        self._call(reset)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see `GET /_stats`)."""
        return self._call(self.app.stats.as_dict)

    def last_request(self) -> Any:
        """The JSON body of the last chat-completion request (None if none or unparsable)."""
        return self._call(lambda: self.app.stats.last_request)


# -- CLI ----------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fake_upstream", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--paced", action="store_true", help="300 ms TTFT ±100, 40 tok/s ±10 ms, 300 tokens"
    )
    preset.add_argument("--zero", action="store_true", help="no delays, 300 tokens")
    parser.add_argument("--ttft-ms", type=float)
    parser.add_argument("--ttft-jitter-ms", type=float)
    parser.add_argument("--tps", type=float, dest="tokens_per_second", help="0 = unpaced")
    parser.add_argument("--gap-jitter-ms", type=float)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--scenario", default="", help="JSON object of further Scenario fields (applied last)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    base = PACED if args.paced else ZERO if args.zero else Scenario()
    flags = ("ttft_ms", "ttft_jitter_ms", "tokens_per_second", "gap_jitter_ms", "tokens", "seed")
    fields = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    try:
        fields.update(json.loads(args.scenario) if args.scenario else {})
        scenario = scenario_with(base, fields)
    except (ValueError, msgspec.ValidationError) as exc:
        print(f"invalid scenario: {exc}", file=sys.stderr)
        return 2
    app = FakeUpstreamApp(scenario, model=args.model)
    sock = _bind(args.host, args.port)
    url = _root_url(sock)

    def announce() -> None:
        # A parent process waits for exactly this line (and reads the port from it).
        print(f"fake upstream listening on {url}/v1", flush=True)

    server = _Server(_config(app, quiet=False), app, on_ready=announce, collect_when_idle=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
