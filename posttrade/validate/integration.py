"""Gate test 4, integration: every service healthy with every dependency connected, at
the start of the run and at its end, and no ERROR line in any service's log meanwhile.

Logs are the files the fleet writes (`<home>/logs/services/<service>.log`, or
`--log-dir`); only what was appended after the run started is read, so errors of
earlier runs do not count.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..config import SERVICES
from .context import GateContext
from .report import Check

SECTION = 4

# The services' log format is "%(asctime)s %(levelname)s %(name)s: %(message)s"
# (posttrade worker); uvicorn's own is "ERROR:    message".
_ERROR_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d[ T][\d:.,]+ (?:ERROR|CRITICAL) |(?:ERROR|CRITICAL):\s)")
_LOG_LINE = re.compile(r"^(?:\d{4}-\d\d-\d\d[ T][\d:.,]+ [A-Z]+ |[A-Z]+:\s)")


def is_error_line(line: str) -> bool:
    return bool(_ERROR_LINE.match(line))


def error_lines(lines: list[str]) -> list[str]:
    """The ERROR/CRITICAL lines, each with the last line of the traceback that follows
    it, if any (the exception itself: "timer failed" alone says little)."""
    found = []
    for i, line in enumerate(lines):
        if not is_error_line(line):
            continue
        cause = None
        for following in lines[i + 1 :]:
            if _LOG_LINE.match(following):
                break
            if following.strip() and not following.startswith((" ", "\t", "Traceback")):
                cause = following.strip()
        found.append(f"{line}  [{cause}]" if cause else line)
    return found


class LogWatch:
    """Remembers where each service log ended when the run started."""

    def __init__(self, logs: dict[str, Path]):
        self.logs = dict(logs)
        self.offsets = {service: _size(path) for service, path in self.logs.items()}

    def new_lines(self, service: str) -> list[str] | None:
        """Lines appended since the start; None if the log does not exist."""
        path = self.logs[service]
        try:
            with path.open("rb") as file:
                size = path.stat().st_size
                offset = self.offsets[service] or 0
                file.seek(offset if size >= offset else 0)  # shorter: it was truncated or replaced
                data = file.read()
        except FileNotFoundError:
            return None
        return data.decode("utf-8", "replace").splitlines()

    def errors(self) -> tuple[dict[str, list[str]], list[str]]:
        """(ERROR lines per service, services whose log is missing)."""
        found, missing = {}, []
        for service in self.logs:
            lines = self.new_lines(service)
            if lines is None:
                missing.append(service)
                continue
            found[service] = error_lines(lines)
        return found, missing


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


@dataclass
class Health:
    service: str
    status: int | None  # HTTP status; None when it did not answer
    checks: dict[str, Any]
    error: str | None = None

    @property
    def failing(self) -> list[str]:
        """The dependencies and agents the service itself reports not ok."""
        return sorted(name for name, check in self.checks.items() if not (isinstance(check, dict) and check.get("ok")))


async def health_of(ctx: GateContext, service: str) -> Health:
    try:
        response = await ctx.http.get(ctx.url(service, "/health"), timeout=10.0)
    except httpx.HTTPError as exc:
        return Health(service, None, {}, f"{type(exc).__name__}: {exc}")
    try:
        body = response.json()
    except ValueError:
        return Health(service, response.status_code, {}, f"not JSON: {response.text[:200]}")
    return Health(service, response.status_code, body.get("checks") or {})


async def health_all(ctx: GateContext) -> list[Health]:
    return list(await asyncio.gather(*(health_of(ctx, service) for service in SERVICES)))


def lagging(healths: list[Health], max_lag: int) -> dict[str, int]:
    """`<service> <agent>` -> its lag, for every agent more than `max_lag` messages behind."""
    return {
        f"{h.service} {name.removeprefix('agent:')}": check["lag"]
        for h in healths for name, check in h.checks.items()
        if name.startswith("agent:") and isinstance(check, dict) and isinstance(check.get("lag"), int)
        and check["lag"] > max_lag
    }  # fmt: skip


async def wait_caught_up(ctx: GateContext, timeout_s: float, max_lag: int = 1000,
                         interval_s: float = 1.0) -> tuple[float, dict[str, int]]:  # fmt: skip
    """Wait until no agent is more than `max_lag` messages behind its stream, or
    `timeout_s`: (seconds waited, the agents still behind). A service that has just
    started may have a stream's history to read first (pnl takes the last position of
    every key on POSITIONS); test data published meanwhile would wait behind it."""
    began = time.monotonic()
    while True:
        behind = lagging(await health_all(ctx), max_lag)
        waited = time.monotonic() - began
        if not behind or waited >= timeout_s:
            return waited, behind
        await asyncio.sleep(interval_s)


def health_checks(start: list[Health], end: list[Health]) -> list[Check]:
    rounds = {"start": start, "end": end}
    not_200 = [f"{when}: {h.service} " + (f"HTTP {h.status}" if h.status else f"no answer ({h.error})")
               for when, healths in rounds.items() for h in healths if h.status != 200]  # fmt: skip
    answered = sum(h.status == 200 for healths in rounds.values() for h in healths)
    checks = [
        Check(SECTION, "integration.health", "every service's /health answers 200 (at the start and at the end)",
              not not_200, f"{answered}/{len(start) + len(end)} answered 200", details={"not_200": not_200}),
    ]  # fmt: skip
    failing = [f"{when}: {h.service} {name}: {h.checks.get(name)}"
               for when, healths in rounds.items() for h in healths for name in h.failing]  # fmt: skip
    total = sum(len(h.checks) for healths in rounds.values() for h in healths)
    dependencies = sorted({name for h in end for name in h.checks if not name.startswith("agent:")})
    silent = [f"{when}: {h.service}" for when, healths in rounds.items() for h in healths if not h.checks]
    checks.append(
        Check(SECTION, "integration.dependencies",
              "every dependency and agent each service reports is connected / running",
              not failing and not silent,
              f"{total - len(failing)}/{total} checks ok ({', '.join(dependencies)} and the agents)",
              details={"not_ok": failing, "no_checks_reported": silent})  # fmt: skip
    )
    return checks


def log_check(watch: LogWatch | None, log_dir: Path | None) -> Check:
    name, criterion = "integration.logs", "no ERROR lines in the services' logs during the run"
    if watch is None:
        return Check(SECTION, name, criterion, False, "no log directory (give --log-dir)")
    errors, missing = watch.errors()
    count = sum(len(lines) for lines in errors.values())
    lines = [f"{service}: {line}" for service, found in errors.items() for line in found]
    measured = f"{count} ERROR lines in {len(errors)} logs" + (f"; missing: {', '.join(missing)}" if missing else "")
    return Check(SECTION, name, criterion, count == 0 and not missing, measured, value=count, limit=0,
                 details={"log_dir": str(log_dir) if log_dir else None, "errors": lines, "missing_logs": missing})  # fmt: skip


def crash_check(crashed: list[tuple[str, int, str]]) -> Check:
    """Only with --start: the fleet's own view of its processes."""
    return Check(SECTION, "integration.processes", "no service process exited during the run", not crashed,
                 f"{len(crashed)} exited" if crashed else "all 6 processes running",
                 details={"crashed": [f"{s} (exit {code}): {tail[-600:]}" for s, code, tail in crashed]})  # fmt: skip
