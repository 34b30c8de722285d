"""`posttrade worker SERVICE`: run one of the six services in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import sys

from ..config import SERVICES, ConfigError, load_config
from ..services import service_module


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("worker", help="run one service (agents, timers and its web API)")
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--config", help="config file (default: config/backend/SERVICE/config.yaml)")
    parser.set_defaults(handler=run)


# glibc's mallopt parameter for the most arenas malloc may create (malloc.h).
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def bound_native_memory() -> None:
    """Keep what native code holds in worker threads small and bounded.

    ptrc's reports spool and report generation run pyarrow (CSV to Arrow to Parquet) and
    chdb in worker threads. By default glibc gives threads up to eight arenas per core and
    pyarrow its own mimalloc pool. Each thread keeps the memory it used, so RSS rose by
    20-60 MB after each 5-minute export until every thread had its share (docs/ptrc.md,
    "Memory"). Two arenas and Arrow on the system allocator reuse that memory instead.
    Must run before any thread starts and before pyarrow is imported. An explicit
    `MALLOC_ARENA_MAX` or `ARROW_DEFAULT_MEMORY_POOL` in the environment wins."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # not glibc (musl has no arenas to bound)


def run(args: argparse.Namespace) -> int:
    bound_native_memory()
    try:
        module = service_module(args.service)
        config = load_config(args.service, module.CONFIG, path=args.config)
    except (LookupError, ConfigError) as exc:
        print(f"posttrade worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.service.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Per-request client logs would drown the service's own.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = module.build(config).app
    asyncio.run(
        app.run(
            host=config.service.host,
            port=config.service.port,
            metrics_port=config.service.metrics_port,
            auth_token=config.service.auth_token,
            read_token=config.service.read_token,
            protect_health=config.service.protect_health,
        )
    )
    return 0
