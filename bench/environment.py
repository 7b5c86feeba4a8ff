"""What the figures were measured on: the machine, package versions, the gateway's source."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from bench.stack import ROOT

GATEWAY_PACKAGES: Final = (
    "litestar",
    "uvicorn",
    "uvloop",
    "httptools",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "openai",
    "httpx2",
    "msgspec",
    "prometheus-client",
    "opentelemetry-sdk",
    "matplotlib",
)


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def packages() -> dict[str, str | None]:
    return {name: version(name) for name in GATEWAY_PACKAGES}


def machine() -> dict[str, Any]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = int(first.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def gateway_source(ref: str | None) -> str:
    """The git ref benchmarked, or the working tree and whether src/ has local changes."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    if ref is not None:
        return f"{ref} ({git('rev-parse', '--short', ref)})"
    dirty = bool(git("status", "--porcelain", "--", "src"))
    head = git("rev-parse", "--short", "HEAD")
    return f"working tree at {head}" + (" with uncommitted changes in src/" if dirty else "")
