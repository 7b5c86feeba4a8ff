"""Loaded by the gateway's Python at start-up when `bench.profile_gateway --stalls` puts this
folder on its PYTHONPATH: SIGUSR1 starts watching the event loop, the next SIGUSR1 stops and
writes $QNA_BENCH_STALLS (JSON).

A callback re-armed every millisecond stamps the time it ran, so its lateness is how long a
ready callback waited for the loop: a token to relay, a request to answer. A thread looks at
the stamp every millisecond and, while it is older than $QNA_BENCH_STALL_MS, samples the main
thread's stack. A sampling profiler weighs every busy moment alike; this one looks only at
the moments that make the tail of the added latency. The collector's runs are timed too
(gc.callbacks), since a stack sampled during one shows only the code that allocated.
"""

import asyncio
import gc
import json
import os
import signal
import sys
import threading
import time
import types
from typing import Any

_path = os.environ.get("QNA_BENCH_STALLS")
_threshold = float(os.environ.get("QNA_BENCH_STALL_MS", "5")) / 1000
_TICK = 0.001


def _frame_name(frame: types.FrameType) -> str:
    """As py-spy names a frame: `qualname (short path)`."""
    code = frame.f_code
    path = code.co_filename
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{code.co_qualname} ({path})"


def _stack(frame: types.FrameType | None) -> str:
    names: list[str] = []
    while frame is not None:
        names.append(_frame_name(frame))
        frame = frame.f_back
    return ";".join(reversed(names))


class _Watch:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.main = threading.main_thread().ident
        self.due = time.monotonic() + _TICK
        self.last = time.monotonic()
        self.lateness: list[float] = []
        self.stalls: list[dict[str, Any]] = []
        self.on = True
        self.collections: list[tuple[float, float, int]] = []  # start, seconds, generation
        self.gc_started = 0.0
        gc.callbacks.append(self._gc)
        # The watcher only runs when it gets the GIL: every 5 ms by default while the loop
        # is busy in Python, too coarse for stalls of 10 ms.
        self.switch = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
        loop.call_later(_TICK, self._tick)
        self.thread = threading.Thread(target=self._watch, name="stallwatch", daemon=True)
        self.thread.start()

    def _tick(self) -> None:
        now = time.monotonic()
        self.lateness.append(now - self.due)
        self.last = now
        if self.on:
            self.due = now + _TICK
            self.loop.call_later(_TICK, self._tick)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.gc_started = time.monotonic()
        else:
            now = time.monotonic()
            self.collections.append((self.gc_started, now - self.gc_started, info["generation"]))

    def _watch(self) -> None:
        current: dict[str, Any] | None = None
        while self.on:
            time.sleep(_TICK)
            now = time.monotonic()
            stalled = now - self.last > _threshold
            if stalled:
                if current is None or current["start"] != self.last:
                    current = {"start": self.last, "samples": []}
                    self.stalls.append(current)
                frame = sys._current_frames().get(self.main) if self.main else None
                current["samples"].append(_stack(frame))
                current["seen"] = now - current["start"]
            else:
                current = None

    def stop(self) -> dict[str, Any]:
        self.on = False
        gc.callbacks.remove(self._gc)
        self.thread.join()
        sys.setswitchinterval(self.switch)
        return {"tick": _TICK, "threshold": _threshold, "lateness": self.lateness,
                "stalls": self.stalls, "collections": self.collections}  # fmt: skip


_watch: _Watch | None = None


def _toggle(signum: int, frame: types.FrameType | None) -> None:
    global _watch
    if _watch is None:
        _watch = _Watch(asyncio.get_running_loop())
    else:
        result = _watch.stop()
        _watch = None
        if _path:
            with open(_path + ".part", "w") as out:
                json.dump(result, out)
            os.replace(_path + ".part", _path)


if _path:
    signal.signal(signal.SIGUSR1, _toggle)
