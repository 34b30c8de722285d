"""One generic supervisor for the stack's servers: pidfiles, start, wait for health, stop.

Layout under the stack's home:
    run/<server>.pid    pid of the server `up` started
    logs/<server>.log   its stdout and stderr, appended across restarts
    <server>/           its working directory: config file and data

A pid alone proves nothing (pids are reused), so a process counts as ours only while its
binary has the server's name *and* its working directory is the server's folder under this
home. That is what keeps `down` from ever signalling anything else, and what lets two
stacks with different homes run side by side.

The pidfile, recognition, lock, signal and log-tail helpers are public because the
service fleet (`posttrade.stack.fleet`) keeps its processes the same way.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .endpoints import NATS_CLUSTER_FILE, Endpoints, endpoints
from .servers import Server, StackError, nats_server, stack_servers

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
    """How stopping one process went: a server's, or a service's (`ServiceFleet`)."""

    name: str
    pid: int | None
    outcome: str  # "stopped", "killed", "not running" or "still running"

    def __str__(self) -> str:
        return f"{self.name}: {self.outcome}" + (f" (pid {self.pid})" if self.pid else "")


def pidfile(ep: Endpoints, server: Server) -> Path:
    return ep.home / "run" / f"{server.name}.pid"


def logfile(ep: Endpoints, server: Server) -> Path:
    return ep.home / "logs" / f"{server.name}.log"


def _readlink(path: str) -> Path:
    # A binary replaced by a reinstall, or a folder removed under a running server, reads as
    # "<path> (deleted)"; it is still the same process.
    return Path(os.readlink(path).removesuffix(" (deleted)"))


def process_is(pid: int, executable: str, workdir: Path) -> bool:
    """Whether `pid` is alive, runs a binary named `executable` and works in `workdir`."""
    try:
        exe = _readlink(f"/proc/{pid}/exe")
        cwd = _readlink(f"/proc/{pid}/cwd")
    except OSError:  # gone, a zombie (its links are unreadable), or another user's
        return False
    return exe.name == executable and cwd == workdir


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] != "Z"


def is_our_process(pid: int, server: Server, ep: Endpoints) -> bool:
    return process_is(pid, server.executable, server.data_dir(ep))


def read_pidfile(path: Path, is_ours: Callable[[int], bool]) -> int | None:
    """The pid in `path`, if that process is alive and `is_ours` recognises it."""
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if is_ours(pid) else None


def write_pidfile(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(f"{pid}\n")
    path.with_suffix(".tmp").replace(path)  # atomic: a reader sees no pidfile or a whole one


def running_pid(ep: Endpoints, server: Server) -> int | None:
    """The pid from the server's pidfile, if that process is alive and really is our server."""
    return read_pidfile(pidfile(ep, server), lambda pid: is_our_process(pid, server, ep))


def file_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def log_tail(ep: Endpoints, server: Server, lines: int = LOG_TAIL_LINES) -> str:
    return file_tail(logfile(ep, server), lines)


def require_proc() -> None:
    if not Path("/proc/self/cwd").exists():
        raise StackError("the local stack needs Linux: it recognises its servers through /proc")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port left in TIME_WAIT by a server we just stopped is free to use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing) while the block runs."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _locked(ep: Endpoints):
    # Two `up`s at once (make and a test fixture, two terminals) must not both start a server.
    return locked(ep.home / "run" / "stack.lock")


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
        preexec_fn=(lambda: os.nice(server.nice)) if server.nice else None,
    )  # fmt: skip
    pid = int(launched.stdout)
    write_pidfile(pidfile(ep, server), pid)
    return pid


def _wait_healthy(ep: Endpoints, pids: dict[Server, int]) -> dict[Server, str]:
    """Poll every server until it answers its health check; returns why the others did not."""
    pending, failures = dict(pids), {}
    began = time.monotonic()
    while pending:
        for server, pid in list(pending.items()):
            if not is_our_process(pid, server, ep):
                if _running(pid) and time.monotonic() - began <= server.start_timeout:
                    continue  # the launcher's child has not exec'd the server yet (a busy machine)
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
    env_var = ep.port_variables()
    return [
        f"{ep.host}:{port} ({server.name} {label}, {env_var[port]})"
        for server in servers
        for label, port in server.ports(ep).items()
        if port_in_use(ep.host, port)
    ]


def _nats_nodes_on_disk(ep: Endpoints) -> list[Server]:
    """The NATS nodes with a pidfile under this home, whatever layout `ep` describes."""
    return [nats_server(path.stem) for path in sorted((ep.home / "run").glob("nats*.pid"))]


def up(ep: Endpoints | None = None, names: Iterable[str] | None = None) -> list[ServerState]:
    """Make every server (or those named) run and answer its health check; idempotent.

    Servers already running from our pidfiles are kept. Raises StackError, after stopping
    whatever it started that did not become healthy, when a server cannot be started.
    """
    ep = ep or endpoints()
    require_proc()
    for folder in (ep.home, ep.chdb_dir):
        folder.mkdir(parents=True, exist_ok=True)
    servers = _selected(ep, names)
    with _locked(ep):
        layout = stack_servers(ep)
        other_layout = [s.name for s in _nats_nodes_on_disk(ep) if s not in layout and running_pid(ep, s)]
        if other_layout:
            raise StackError(
                f"NATS runs here as {', '.join(other_layout)}, not as the {ep.nats_cluster} node(s) asked for: "
                "`posttrade stack down` first"
            )
        running = {server: running_pid(ep, server) for server in servers}
        missing = [server for server, pid in running.items() if pid is None]
        taken = _taken_ports(ep, missing)
        if taken:
            raise StackError(
                "port(s) already in use by processes this stack did not start:\n  "
                + "\n  ".join(taken)
                + "\nStop them, or choose other ports through the variables named above."
            )
        # What runs here from now on, for the `env`, `status` and `down` that do not say.
        cluster_file = ep.home / NATS_CLUSTER_FILE
        if ep.nats_cluster > 1:
            cluster_file.write_text(f"{ep.nats_cluster}\n")
        else:
            cluster_file.unlink(missing_ok=True)
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


def send_signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it exited between our check and the signal: what we wanted
        pass


def wait_reaped(pid: int, timeout: float = 2.0) -> None:
    # A stopped server is a zombie until init reaps it; waiting a moment for that means a
    # `pgrep` right after `down` shows nothing. A pid 1 that never reaps costs us 2 s, no more.
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


K = TypeVar("K")


def terminate(
    pids: Mapping[K, int | None],
    still_ours: Callable[[K, int], bool],
    grace: float = STOP_TIMEOUT,
    kill_grace: float = KILL_TIMEOUT,
) -> dict[K, str]:
    """SIGTERM every pid, wait up to `grace` for them to go, SIGKILL those that stay.

    `still_ours(key, pid)` says whether the process is still running (and still ours);
    outcome per key: "stopped", "killed", "not running" (pid None) or "still running".
    """
    # SIGTERM to all first, then wait for all: they shut down in parallel.
    for pid in pids.values():
        if pid is not None:
            send_signal(pid, signal.SIGTERM)
    outcomes = {}
    deadline = time.monotonic() + grace
    for key, pid in pids.items():
        outcome = "not running" if pid is None else "stopped"
        while pid is not None and still_ours(key, pid):
            if time.monotonic() > deadline:
                if outcome == "killed":
                    outcome = "still running"
                    break
                send_signal(pid, signal.SIGKILL)
                outcome, deadline = "killed", time.monotonic() + kill_grace
            time.sleep(0.1)
        outcomes[key] = outcome
    return outcomes


def _stop(ep: Endpoints, servers: Iterable[Server]) -> list[StopResult]:
    pids = {server: running_pid(ep, server) for server in servers}
    outcomes = terminate(pids, lambda server, pid: is_our_process(pid, server, ep))
    results = []
    for server, pid in pids.items():
        if outcomes[server] != "still running":
            pidfile(ep, server).unlink(missing_ok=True)
            if pid is not None:
                wait_reaped(pid)
        results.append(StopResult(server.name, pid, outcomes[server]))
    return results


def _selected(ep: Endpoints, names: Iterable[str] | None, extra: Iterable[Server] = ()) -> list[Server]:
    known = list(stack_servers(ep)) + [server for server in extra if server not in stack_servers(ep)]
    if names is None:
        return known
    wanted = set(names)
    unknown = wanted - {server.name for server in known}
    if unknown:
        raise StackError(f"no such server in the stack: {', '.join(sorted(unknown))}")
    return [server for server in known if server.name in wanted]


def down(ep: Endpoints | None = None, names: Iterable[str] | None = None) -> list[StopResult]:
    """Stop the servers `up` started (all, or those named), by the pids in their pidfiles.

    NATS nodes are found by their pidfiles too, so a cluster is stopped whole even when
    `ep` describes another layout."""
    ep = ep or endpoints()
    require_proc()
    with _locked(ep):
        servers = _selected(ep, names, extra=_nats_nodes_on_disk(ep))
        results = _stop(ep, servers)
        if not _nats_nodes_on_disk(ep):
            (ep.home / NATS_CLUSTER_FILE).unlink(missing_ok=True)
        return results


def status(ep: Endpoints | None = None) -> list[ServerState]:
    ep = ep or endpoints()
    require_proc()
    states = []
    for server in stack_servers(ep):
        pid = running_pid(ep, server)
        states.append(ServerState(server, pid, healthy=pid is not None and server.healthy(ep)))
    return states
