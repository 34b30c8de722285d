"""The six services as processes, each with an auth token and a read-only token, for the
API fuzzer and the auth tests (tests/integration/test_api_fuzz.py, test_auth.py).

Started in parallel (one service's start does not wait for another's); what a service
writes that is not the stack's shared history goes to the test's own places: ptrc's
reports to a local directory, feast_pipeline's repository and project to its own.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from posttrade.config import SERVICES

from .service_process import ServiceProcess

START_TIMEOUT_S = 240.0  # feast_pipeline applies its repository; pnl reads the POSITIONS history


class Tokens:
    def __init__(self) -> None:
        self.full = secrets.token_hex(16)
        self.read = secrets.token_hex(16)


def service_env(service: str, tokens: Tokens, tmp: Path) -> dict[str, str]:
    prefix = f"POSTTRADE_{service.upper()}__"
    env = {f"{prefix}SERVICE__AUTH_TOKEN": tokens.full, f"{prefix}SERVICE__READ_TOKEN": tokens.read}
    if service == "ptrc":
        env[f"{prefix}STORAGE__LOCAL_DIR"] = str(tmp / "ptrc-objects")
    if service == "feast_pipeline":
        env[f"{prefix}FEAST__DATA_DIR"] = str(tmp / "feast")
        env[f"{prefix}FEAST__PROJECT"] = f"fuzz_{uuid.uuid4().hex[:8]}"
    return env


@contextmanager
def token_fleet(
    stack,
    tmp: Path,
    services: tuple[str, ...] = SERVICES,
    *,
    tokens: Tokens | None = None,
    on_ready: Callable[[str, ServiceProcess, float], None] | None = None,
    link_pages: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[dict[str, ServiceProcess], Tokens]]:
    """Start `services`, yield them once all are healthy, stop them at the end.
    `on_ready(name, process, seconds to start)` is called (from a thread) as each one is.
    `link_pages`: each page's navigation bar points at these services' ports. `env`: more
    environment for every service."""
    tokens = tokens or Tokens()
    tmp.mkdir(parents=True, exist_ok=True)
    procs = {name: ServiceProcess(name, stack, tmp, env=service_env(name, tokens, tmp)) for name in services}
    extra = dict(env or {})
    if link_pages:
        extra |= {f"POSTTRADE__DASHBOARD__LINKS__{name.upper()}": proc.url for name, proc in procs.items()}
    for proc in procs.values():
        proc.env.update(extra)

    def start(name: str) -> None:
        began = time.monotonic()
        procs[name].start(START_TIMEOUT_S)
        if on_ready is not None:
            on_ready(name, procs[name], time.monotonic() - began)

    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            for future in [pool.submit(start, name) for name in procs]:
                future.result()
        yield procs, tokens
    finally:
        with ThreadPoolExecutor(len(procs)) as pool:
            errors = [f.exception() for f in [pool.submit(p.stop) for p in procs.values()]]
        for error in errors:
            if error is not None:
                raise error
