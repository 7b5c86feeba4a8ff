"""Child processes: started pinned to a core, CPU time and RSS read from /proc, stopped.

Linux only (it reads /proc and pins with `taskset`), like the machine the figures are for.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of `pid` so far; 0 once it has gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; the fields after its ")" are plain.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` now; 0 once it has gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_bytes().split()[1]) * _PAGE
    except OSError:
        return 0


def machine_busy_seconds() -> float:
    """CPU time every core of the machine has spent busy since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """`command` run on one core (when there is a core to spare and taskset exists)."""
    if core is None or shutil.which("taskset") is None:
        return list(command)
    return ["taskset", "-c", str(core), *command]


@dataclass
class Service:
    """A child process with its log file; `stop` ends it (and only it) with SIGTERM, then KILL."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    async def stop(self, grace: float = 30.0) -> int | None:
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.process.wait), grace)
            except TimeoutError:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self.log.close()
        return self.process.returncode


def start_service(
    name: str,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    log_dir: Path,
    core: int | None,
    stdout: int | None = None,
) -> Service:
    """Start `command` on `core`; stderr (and stdout unless piped) go to `<log_dir>/<name>.log`."""
    log_path = log_dir / f"{name}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        pinned(command, core),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout if stdout is not None else log,
        stderr=log,
    )
    return Service(name, process, log_path, log)


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds and RSS of a set of processes at one moment."""

    cpu: dict[str, float]
    rss: dict[str, int]


def usage_of(pids: Mapping[str, int]) -> Usage:
    return Usage(
        cpu={name: cpu_seconds(pid) for name, pid in pids.items()},
        rss={name: rss_bytes(pid) for name, pid in pids.items()},
    )


def cpu_delta(before: Usage, after: Usage) -> dict[str, float]:
    return {name: after.cpu[name] - before.cpu.get(name, 0.0) for name in after.cpu}


class PeakSampler:
    """Samples the RSS of some processes every `interval` seconds and keeps each one's peak."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.1) -> None:
        self._pids = dict(pids)
        self._interval = interval
        self.peak: dict[str, int] = dict.fromkeys(self._pids, 0)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for name, pid in self._pids.items():
                self.peak[name] = max(self.peak[name], rss_bytes(pid))
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, int]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for name, pid in self._pids.items():  # one last look
            self.peak[name] = max(self.peak[name], rss_bytes(pid))
        return dict(self.peak)


def mapped_libraries(pid: int, needles: Sequence[str]) -> dict[str, bool]:
    """Which of `needles` appear among the files mapped into `pid` (what it really imported)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return dict.fromkeys(needles, False)
    return {needle: needle in maps for needle in needles}
