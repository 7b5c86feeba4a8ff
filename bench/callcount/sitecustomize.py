"""Loaded by the gateway's Python at start-up when `bench.profile_gateway --count-calls` puts
this folder on its PYTHONPATH: SIGUSR1 starts cProfile in the main thread, the next SIGUSR1
stops it and writes the stats to $QNA_BENCH_CPROFILE. Call counts, unlike CPU seconds, are the
same from run to run on a noisy VM."""

import cProfile
import os
import signal
import types

_path = os.environ.get("QNA_BENCH_CPROFILE")
_profiler = cProfile.Profile()
_on = False


def _toggle(signum: int, frame: types.FrameType | None) -> None:
    global _on
    if not _on:
        _profiler.enable()
    else:
        _profiler.disable()
        if _path:
            _profiler.dump_stats(_path)
    _on = not _on


if _path:
    signal.signal(signal.SIGUSR1, _toggle)
