"""`EventStreamResponse`: emits go out at once from the emitting task, in order, and only a
send that waits for the transport hands the sending to a task of its own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qna_gateway.sse import EventSink, EventStreamResponse, _run_until_it_waits


class Transport:
    """An ASGI `send`/`receive` pair that records bodies and can be made to block."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.ended = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.disconnect = asyncio.Event()
        self.sends_by_task: list[asyncio.Task[Any] | None] = []

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            return
        self.sends_by_task.append(asyncio.current_task())
        if not self.writable.is_set():
            await self.writable.wait()
        if message["body"]:
            self.bodies.append(message["body"])
        if not message.get("more_body", False):
            self.ended = True

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}


def response(produce: Any, **kwargs: Any) -> EventStreamResponse:
    return EventStreamResponse(
        produce, headers={}, ping_seconds=kwargs.pop("ping_seconds", 30.0), send_timeout=5.0
    )


async def test_an_emit_is_sent_by_the_emitting_task_before_emit_returns() -> None:
    transport = Transport()
    emitted = asyncio.Event()
    proceed = asyncio.Event()
    sinks: list[EventSink] = []

    async def produce(sink: EventSink) -> None:
        sinks.append(sink)
        emitted.set()
        await proceed.wait()

    app = asyncio.create_task(response(produce)({}, transport.receive, transport.send))
    await emitted.wait()
    sinks[0].emit(b"one")  # from this task, not the response's
    assert transport.bodies == [b"one"]
    assert transport.sends_by_task == [asyncio.current_task()]
    proceed.set()
    await app
    assert transport.ended


async def test_emits_while_the_transport_is_full_wait_and_go_out_in_order() -> None:
    transport = Transport()
    ready = asyncio.Event()
    finish = asyncio.Event()
    sinks: list[EventSink] = []

    async def produce(sink: EventSink) -> None:
        sinks.append(sink)
        ready.set()
        await finish.wait()

    app = asyncio.create_task(response(produce)({}, transport.receive, transport.send))
    await ready.wait()
    sink = sinks[0]
    transport.writable.clear()
    sink.emit(b"a")  # this send waits: a task takes it over
    sink.emit(b"b")
    sink.emit(b"c")
    assert transport.bodies == []
    finish.set()  # the producer is done; the response still sends what it emitted
    await asyncio.sleep(0.01)
    assert not app.done()
    transport.writable.set()
    await app
    # What waited behind the blocked send goes in one write, in order.
    assert transport.bodies == [b"a", b"bc"]
    assert transport.ended


async def test_the_client_leaving_cancels_the_producer_and_later_emits_do_nothing() -> None:
    transport = Transport()
    cancelled = asyncio.Event()
    sinks: list[EventSink] = []

    async def produce(sink: EventSink) -> None:
        sinks.append(sink)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    app = asyncio.create_task(response(produce)({}, transport.receive, transport.send))
    await asyncio.sleep(0)
    transport.disconnect.set()
    await app  # returns quietly
    assert cancelled.is_set()
    sinks[0].emit(b"late")
    assert transport.bodies == []
    assert not transport.ended


async def test_a_ping_goes_out_on_an_idle_stream() -> None:
    transport = Transport()
    done = asyncio.Event()

    async def produce(sink: EventSink) -> None:
        await done.wait()

    app = asyncio.create_task(
        response(produce, ping_seconds=0.05)({}, transport.receive, transport.send)
    )
    async with asyncio.timeout(5):
        while not transport.bodies:
            await asyncio.sleep(0.01)
    done.set()
    await app
    assert transport.bodies[0] == b": ping\n\n"


async def test_run_until_it_waits_finishes_a_coroutine_that_does_not_wait() -> None:
    steps: list[str] = []

    async def quick() -> None:
        steps.append("ran")

    assert _run_until_it_waits(quick()) is None
    assert steps == ["ran"]


async def test_the_rest_of_a_coroutine_that_waits_runs_in_a_task_with_results_and_errors() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[int] = loop.create_future()
    seen: list[object] = []

    async def slow() -> None:
        seen.append(await first)
        try:
            await second
        except ValueError as exc:
            seen.append(exc)

    rest = _run_until_it_waits(slow())
    assert rest is not None
    assert seen == []
    task = asyncio.ensure_future(rest)
    first.set_result(1)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert seen == [1]
    second.set_exception(ValueError("boom"))
    await task
    assert seen[0] == 1
    assert isinstance(seen[1], ValueError)


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    cleaned = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    rest = _run_until_it_waits(slow())
    assert rest is not None
    task = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()
