"""`python -m bench.run` options: what to sweep, how long to wait, which database."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.stack import DEFAULT_ADMIN_URL, ROOT

CONFIGS: Final = ("upstream", "gateway", "litellm", "relay")
RESULTS: Final = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Options:
    quick: bool
    paced_levels: tuple[int, ...]
    held_levels: tuple[int, ...]
    zero_levels: tuple[int, ...]
    rounds: int
    paced_deadline: float
    zero_deadline: float
    calibrate_seconds: float
    configs: tuple[str, ...]
    refine: int
    gateway_ref: str | None
    gateway_env: dict[str, str]
    pool_max: int
    open_loop: bool
    quiet_wait: float
    quiet_budget: float
    db: str
    admin_url: str
    out_dir: Path
    keep_work: bool


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def options_from_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=(
            "qna-gateway, LiteLLM, a hand-rolled FastAPI relay and the bare upstream, side by side."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="paced 1, 50, 200 and zero-delay 1, one round, no refining: ~2-3 minutes",
    )
    parser.add_argument("--levels", type=_levels, help="paced concurrency levels, e.g. 1,50,200")
    parser.add_argument(
        "--held-levels",
        type=_levels,
        help="levels held open: arrivals at N per stream length for three lengths, measured "
        "over the middle one ('' for none; default 500, the target; quick none)",
    )
    parser.add_argument("--zero-levels", type=_levels, help="zero-delay levels ('' for none)")
    parser.add_argument("--rounds", type=int, help="repeats of every (level, configuration)")
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument(
        "--no-relay", action="store_true", help="leave the hand-rolled FastAPI relay out"
    )
    parser.add_argument(
        "--refine",
        type=int,
        help="bisection probes per system for the capacity figure (default 2; quick 0)",
    )
    parser.add_argument(
        "--gateway-ref", help="benchmark a git ref of the gateway (default: the working tree)"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway (repeatable)",
    )
    parser.add_argument("--pool-max", type=int, default=40, help="QNA_DB_POOL_MAX (default 40)")
    parser.add_argument(
        "--open-loop",
        action="store_true",
        help="paced levels as open-loop arrivals (N/7.8 per second) instead of N workers",
    )
    parser.add_argument(
        "--db",
        choices=("embedded", "shared"),
        default="embedded",
        help="embedded: a PostgreSQL of the run's own with pg_stat_statements (default); "
        "shared: a database created on --admin-url's server",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("BENCH_ADMIN_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL URL allowed to CREATE DATABASE (env BENCH_ADMIN_DATABASE_URL)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait, before each window, for other processes to leave the CPU alone",
    )
    parser.add_argument(
        "--quiet-budget",
        type=float,
        help="total seconds the run may spend waiting for quiet (default 90; quick 30)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--keep-work", action="store_true", help="keep logs and raw windows")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    left_out = {"litellm": args.no_litellm, "relay": args.no_relay}
    configs = tuple(c for c in CONFIGS if not left_out.get(c))
    return Options(
        quick=quick,
        paced_levels=args.levels
        if args.levels is not None
        else ((1, 50, 200) if quick else (1, 50, 200, 500, 1000)),
        held_levels=args.held_levels if args.held_levels is not None else (() if quick else (500,)),
        zero_levels=args.zero_levels
        if args.zero_levels is not None
        else ((1,) if quick else (1, 50, 200)),
        rounds=args.rounds or (1 if quick else 2),
        paced_deadline=15.0 if quick else 20.0,
        zero_deadline=10.0 if quick else 15.0,
        calibrate_seconds=3.0,
        configs=configs,
        refine=args.refine if args.refine is not None else (0 if quick else 2),
        gateway_ref=args.gateway_ref,
        gateway_env=dict(item.split("=", 1) for item in args.gateway_env),
        pool_max=args.pool_max,
        open_loop=bool(args.open_loop),
        quiet_wait=max(0.0, args.quiet_wait),
        quiet_budget=args.quiet_budget
        if args.quiet_budget is not None
        else (30.0 if quick else 90.0),
        db=args.db,
        admin_url=args.admin_url,
        out_dir=args.out_dir,
        keep_work=bool(args.keep_work),
    )
