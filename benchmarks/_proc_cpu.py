"""CPU time of other processes, for the benchmarks' CPU-per-event figures (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used, every thread (OSError if gone)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)"
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def stack_server_pids(ep, names: tuple[str, ...] = ("nats", "questdb", "valkey")) -> dict[str, int]:
    """The pids of the local stack's servers named `names` that run (a NATS cluster's
    nodes are `nats-1`, `nats-2`, ...: all of them count as `nats` prefixes)."""
    from posttrade.stack.servers import stack_servers
    from posttrade.stack.supervisor import running_pid

    pids = {}
    for server in stack_servers(ep):
        if server.name.split("-")[0] in names:
            pid = running_pid(ep, server)
            if pid is not None:
                pids[server.name] = pid
    return pids


class CpuMeter:
    """CPU seconds of named processes between `start()` and `stop()` (a process gone by
    then is left out: its figure is unknown)."""

    def __init__(self, pids: dict[str, int]):
        self.pids = dict(pids)
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        readings = {}
        for name, pid in self.pids.items():
            try:
                readings[name] = cpu_seconds(pid)
            except OSError:
                pass
        return readings

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds per process since `start()`."""
        now = self._read()
        return {name: now[name] - began for name, began in self._start.items() if name in now}
