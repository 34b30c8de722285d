"""One generic supervisor for the stack's servers: pidfiles, start, wait for health, stop.

Layout under the stack's home:
    run/<server>.pid    pid of the server `up` started
    logs/<server>.log   its stdout and stderr, appended across restarts
    <server>/           its working directory: config file and data

A pid alone proves nothing (pids are reused), so a process counts as ours only while its
binary has the server's name *and* its working directory is the server's folder under this
home. That is what keeps `down` from ever signalling anything else, and what lets two
stacks with different homes run side by side.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .endpoints import PORT_ENV, Endpoints, endpoints
from .servers import SERVERS, Server, StackError

STOP_TIMEOUT = 30.0  # SIGTERM grace period; QuestDB flushes and closes its tables on shutdown
KILL_TIMEOUT = 5.0
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class ServerState:
    server: Server
    pid: int | None  # None: not running
    healthy: bool
    started: bool = False  # started by this call, as opposed to found running


@dataclass(frozen=True)
class StopResult:
    server: Server
    pid: int | None
    outcome: str  # "stopped", "killed", "not running" or "still running"


def pidfile(ep: Endpoints, server: Server) -> Path:
    return ep.home / "run" / f"{server.name}.pid"


def logfile(ep: Endpoints, server: Server) -> Path:
    return ep.home / "logs" / f"{server.name}.log"


def _readlink(path: str) -> Path:
    # A binary replaced by a reinstall, or a folder removed under a running server, reads as
    # "<path> (deleted)"; it is still the same process.
    return Path(os.readlink(path).removesuffix(" (deleted)"))


def is_our_process(pid: int, server: Server, ep: Endpoints) -> bool:
    try:
        exe = _readlink(f"/proc/{pid}/exe")
        cwd = _readlink(f"/proc/{pid}/cwd")
    except OSError:  # gone, a zombie (its links are unreadable), or another user's
        return False
    return exe.name == server.executable and cwd == server.data_dir(ep)


def running_pid(ep: Endpoints, server: Server) -> int | None:
    """The pid from the server's pidfile, if that process is alive and really is our server."""
    try:
        pid = int(pidfile(ep, server).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if is_our_process(pid, server, ep) else None


def log_tail(ep: Endpoints, server: Server, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(logfile(ep, server).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def _require_proc() -> None:
    if not Path("/proc/self/cwd").exists():
        raise StackError("the local stack needs Linux: it recognises its servers through /proc")


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port left in TIME_WAIT by a server we just stopped is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


@contextmanager
def _locked(ep: Endpoints) -> Iterator[None]:
    # Two `up`s at once (make and a test fixture, two terminals) must not both start a server.
    run = ep.home / "run"
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "stack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# `sh` starts the server in the background and exits at once, so the server is re-parented
# to init like any daemon: it is not a child of this process (which may be a long pytest
# session) and can never linger here as a zombie. start_new_session puts it in a session of
# its own, so a Ctrl-C in the terminal that ran `up` does not reach it.
_LAUNCHER = 'log=$1; shift; "$@" >>"$log" 2>&1 </dev/null & echo $!'


def _spawn(ep: Endpoints, server: Server, argv: list[str]) -> int:
    log = logfile(ep, server)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} posttrade stack up: {shlex.join(argv)}\n")
    launched = subprocess.run(
        ["sh", "-c", _LAUNCHER, "sh", str(log), *argv],
        cwd=server.data_dir(ep), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        start_new_session=True, check=True, text=True,
    )  # fmt: skip
    pid = int(launched.stdout)
    path = pidfile(ep, server)
    path.with_suffix(".tmp").write_text(f"{pid}\n")
    path.with_suffix(".tmp").replace(path)  # atomic: a reader sees no pidfile or a whole one
    return pid


def _wait_healthy(ep: Endpoints, pids: dict[Server, int]) -> dict[Server, str]:
    """Poll every server until it answers its health check; returns why the others did not."""
    pending, failures = dict(pids), {}
    began = time.monotonic()
    while pending:
        for server, pid in list(pending.items()):
            if not is_our_process(pid, server, ep):
                failures[server] = "exited during start-up"
            elif server.healthy(ep):
                pass
            elif time.monotonic() - began > server.start_timeout:
                failures[server] = f"not healthy after {server.start_timeout:.0f} s"
            else:
                continue
            del pending[server]
        if pending:
            time.sleep(0.2)
    return failures


def _taken_ports(ep: Endpoints, servers: Iterable[Server]) -> list[str]:
    env_var = {getattr(ep, field): var for field, var in PORT_ENV.items()}
    return [
        f"{ep.host}:{port} ({server.name} {label}, {env_var[port]})"
        for server in servers
        for label, port in server.ports(ep).items()
        if _port_in_use(ep.host, port)
    ]


def up(ep: Endpoints | None = None) -> list[ServerState]:
    """Make every server run and answer its health check; idempotent.

    Servers already running from our pidfiles are kept. Raises StackError, after stopping
    whatever it started that did not become healthy, when a server cannot be started.
    """
    ep = ep or endpoints()
    _require_proc()
    for folder in (ep.home, ep.chdb_dir, ep.objects_dir):
        folder.mkdir(parents=True, exist_ok=True)
    with _locked(ep):
        running = {server: running_pid(ep, server) for server in SERVERS}
        missing = [server for server, pid in running.items() if pid is None]
        taken = _taken_ports(ep, missing)
        if taken:
            raise StackError(
                "port(s) already in use by processes this stack did not start:\n  "
                + "\n  ".join(taken)
                + "\nStop them, or choose other ports through the variables named above."
            )
        # Write every config (and fetch QuestDB) before starting anything, so a missing
        # binary or a failed download never leaves half a stack behind.
        commands = {}
        for server in missing:
            server.data_dir(ep).mkdir(parents=True, exist_ok=True)
            pidfile(ep, server).unlink(missing_ok=True)  # stale: its process is gone
            commands[server] = server.command(ep, server.data_dir(ep))
        for server, argv in commands.items():
            running[server] = _spawn(ep, server, argv)
        pids = {server: pid for server, pid in running.items() if pid is not None}
        failures = _wait_healthy(ep, pids)
        for server in failures.keys() - commands.keys():
            failures[server] += " (it was already running: if its ports changed since, `down` it first)"
        if failures:
            # The log tails first: stopping a server adds its shutdown lines to its log.
            message = "\n\n".join(
                f"{server.name} {why}; last lines of {logfile(ep, server)}:\n{log_tail(ep, server)}"
                for server, why in failures.items()
            )
            _stop(ep, [server for server in failures if server in commands])  # only what we started
            raise StackError(message + "\n\nServers that did start stay up: `posttrade stack down` stops them.")
    return [ServerState(server, pid, healthy=True, started=server in commands) for server, pid in pids.items()]


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it exited between our check and the signal: what we wanted
        pass


def _wait_reaped(pid: int, timeout: float = 2.0) -> None:
    # A stopped server is a zombie until init reaps it; waiting a moment for that means a
    # `pgrep` right after `down` shows nothing. A pid 1 that never reaps costs us 2 s, no more.
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _stop(ep: Endpoints, servers: Iterable[Server]) -> list[StopResult]:
    pids = {server: running_pid(ep, server) for server in servers}
    # SIGTERM to all first, then wait for all: the servers shut down in parallel.
    for pid in pids.values():
        if pid is not None:
            _signal(pid, signal.SIGTERM)
    results = []
    deadline = time.monotonic() + STOP_TIMEOUT
    for server, pid in pids.items():
        outcome = "not running" if pid is None else "stopped"
        while pid is not None and is_our_process(pid, server, ep):
            if time.monotonic() > deadline:
                if outcome == "killed":
                    outcome = "still running"
                    break
                _signal(pid, signal.SIGKILL)
                outcome, deadline = "killed", time.monotonic() + KILL_TIMEOUT
            time.sleep(0.1)
        if outcome != "still running":
            pidfile(ep, server).unlink(missing_ok=True)
            if pid is not None:
                _wait_reaped(pid)
        results.append(StopResult(server, pid, outcome))
    return results


def down(ep: Endpoints | None = None, names: Iterable[str] | None = None) -> list[StopResult]:
    """Stop the servers `up` started (all, or those named), by the pids in their pidfiles."""
    ep = ep or endpoints()
    _require_proc()
    wanted = set(names) if names is not None else {server.name for server in SERVERS}
    unknown = wanted - {server.name for server in SERVERS}
    if unknown:
        raise StackError(f"no such server in the stack: {', '.join(sorted(unknown))}")
    with _locked(ep):
        return _stop(ep, [server for server in SERVERS if server.name in wanted])


def status(ep: Endpoints | None = None) -> list[ServerState]:
    ep = ep or endpoints()
    _require_proc()
    states = []
    for server in SERVERS:
        pid = running_pid(ep, server)
        states.append(ServerState(server, pid, healthy=pid is not None and server.healthy(ep)))
    return states
