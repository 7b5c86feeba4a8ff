"""Stopping a background task."""

from __future__ import annotations

import asyncio

import pytest

from qna_gateway.tasks import cancel_and_wait


async def until_cancelled() -> None:
    """Background work that never ends by itself."""
    await asyncio.Event().wait()


async def test_waits_for_the_task_to_unwind() -> None:
    unwound = asyncio.Event()

    async def work() -> None:
        try:
            await until_cancelled()
        finally:
            await asyncio.sleep(0.01)  # a finally block that itself awaits
            unwound.set()

    task = asyncio.create_task(work())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert unwound.is_set()
    assert task.cancelled()


async def test_the_callers_own_cancellation_goes_on_up() -> None:
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await until_cancelled()
        finally:
            await release.wait()

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopper = asyncio.create_task(cancel_and_wait(task))
    while not task.cancelling():  # the stopper has cancelled it and waits for it to unwind
        await asyncio.sleep(0)
    stopper.cancel()  # e.g. shutdown cancelling whatever is stopping the services
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert stopper.cancelled()
    release.set()
    await asyncio.wait((task,))


async def test_a_failure_while_unwinding_is_raised() -> None:
    async def fails_on_the_way_out() -> None:
        try:
            await until_cancelled()
        finally:
            raise RuntimeError("cleanup failed")

    task = asyncio.create_task(fails_on_the_way_out())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)


async def test_none_and_a_finished_task_are_fine() -> None:
    await cancel_and_wait(None)

    async def done() -> int:
        return 1

    task = asyncio.create_task(done())
    await task
    await cancel_and_wait(task)
