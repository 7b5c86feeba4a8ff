"""Background tasks the app owns: how one is stopped."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has finished unwinding (its `finally` blocks ran).

    A failure it ended with is raised, as awaiting it would. If the caller is cancelled while
    it waits, that cancellation goes on up: awaiting the task inside
    `suppress(CancelledError)` would swallow it, since the two look alike.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait((task,))
    if not task.cancelled():
        task.result()
