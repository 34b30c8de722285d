"""The six services as separate processes on this machine: start, watch, stop.

Each service runs as `python -m posttrade.cli worker <service>` with the stack's
environment (`posttrade stack env`), on its documented port unless told otherwise.
Layout under the stack's home, beside the servers':

    run/services/<service>.pid    pid of the service process
    logs/services/<service>.log   its stdout and stderr, appended across restarts
    services/<service>/           its working directory (the services write nothing there)

A process counts as ours the way the stack's servers do (`posttrade.stack.supervisor`):
its binary is this Python *and* its working directory is the service's folder under this
home; in addition its command line must name the service. So `posttrade down` in another
terminal stops exactly what a fleet started, and never a process that reused the pid.

Services are bound to 127.0.0.1 unless the environment says otherwise: like the stack,
a local fleet is for one developer machine, not the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import yaml

from ..config import ENV_PREFIX, ConfigError, apply_env_overrides, default_config_dir
from ..services import SERVICES as REGISTERED_SERVICES
from .endpoints import HOME_ENV, HOST, endpoints
from .supervisor import (
    STOP_TIMEOUT,
    StopResult,
    file_tail,
    locked,
    port_in_use,
    process_is,
    read_pidfile,
    require_proc,
    terminate,
    wait_reaped,
    write_pidfile,
)

# The six, in the order they are started (and listed): the registry's order.
SERVICES: tuple[str, ...] = tuple(REGISTERED_SERVICES)

LOG_TAIL_LINES = 30
HEALTH_REQUEST_TIMEOUT_S = 2.0
# The file name of the binary a service process runs: what /proc/<pid>/exe points to.
_PYTHON_BINARY = Path(os.path.realpath(sys.executable)).name


class FleetError(Exception):
    """A service could not be started (or the fleet cannot start); the message says why."""


def _service_var(service: str, key: str) -> str:
    return f"{ENV_PREFIX}_{service.upper()}__SERVICE__{key}"


class ServiceFleet:
    """Some or all of the six services, each its own process.

    `home`: the stack's POSTTRADE_HOME (pidfiles, logs and chdb data go there).
    `env`: extra environment for the service processes, on top of this process's and the
    stack's service environment (NATS, QuestDB, Valkey, SeaweedFS, chdb paths). `ports`:
    service -> API port, overriding config and environment (ptrc's metrics port is set
    through `POSTTRADE_PTRC__SERVICE__METRICS_PORT` in `env`).
    """

    def __init__(
        self,
        home: Path,
        env: Mapping[str, str] | None = None,
        services: Sequence[str] = SERVICES,
        ports: Mapping[str, int] | None = None,
    ):
        require_proc()
        unknown = [s for s in services if s not in SERVICES]
        if unknown:
            raise FleetError(f"no such service: {', '.join(unknown)}; the services are: {', '.join(SERVICES)}")
        self.home = Path(home).expanduser().absolute()
        self.services: tuple[str, ...] = tuple(dict.fromkeys(services))
        # The stack's ports come from the environment (POSTTRADE_STACK_*), its home from here.
        self.stack = endpoints(home=self.home)
        common = {
            **os.environ,
            HOME_ENV: str(self.home),
            **self.stack.service_env(),
            # The services do not run in the repository: tell them where their config is.
            "POSTTRADE_CONFIG_DIR": os.environ.get("POSTTRADE_CONFIG_DIR") or str(default_config_dir().absolute()),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self._env: dict[str, dict[str, str]] = {}
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        # A token to read /health with, for services that protect it (service.protect_health).
        self._health_tokens: dict[str, str] = {}
        for service in self.services:
            service_env = dict(common)
            if _service_var(service, "HOST") not in service_env and f"{ENV_PREFIX}__SERVICE__HOST" not in service_env:
                service_env[_service_var(service, "HOST")] = HOST
            if ports and service in ports:
                service_env[_service_var(service, "PORT")] = str(ports[service])
            section = service_section(service, service_env)
            token = section.get("read_token") or section.get("auth_token")
            if token:
                self._health_tokens[service] = str(token)
            try:
                self.ports[service] = int(section["port"])
                if section.get("metrics_port"):
                    self.metrics_ports[service] = int(section["metrics_port"])
            except (KeyError, TypeError, ValueError) as exc:
                raise FleetError(f"{service}: no usable service.port / metrics_port in its config ({exc!r})") from None
            self._env[service] = service_env
        taken: dict[int, str] = {}
        for service in self.services:
            for label, port in self._ports_of(service).items():
                if port in taken:
                    raise FleetError(f"{service} {label} port {port} is also {taken[port]}'s")
                taken[port] = f"{service} {label}"
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopped: set[str] = set()  # stopped on purpose: not a crash
        # Set by a stop so that a start or restart waiting for health in another thread
        # gives up at once instead of holding the fleet's lock for its whole timeout.
        self._stopping = threading.Event()

    # -- where things are --------------------------------------------------------------

    def urls(self) -> dict[str, str]:
        return {service: f"http://{HOST}:{self.ports[service]}" for service in self.services}

    def log_path(self, service: str) -> Path:
        return self.home / "logs" / "services" / f"{service}.log"

    def pidfile(self, service: str) -> Path:
        return self.home / "run" / "services" / f"{service}.pid"

    def workdir(self, service: str) -> Path:
        return self.home / "services" / service

    def log_tail(self, service: str, lines: int = LOG_TAIL_LINES) -> str:
        return file_tail(self.log_path(service), lines)

    def _ports_of(self, service: str) -> dict[str, int]:
        ports = {"API": self.ports[service]}
        if service in self.metrics_ports:
            ports["metrics"] = self.metrics_ports[service]
        return ports

    # -- recognising our processes -----------------------------------------------------

    def is_ours(self, service: str, pid: int) -> bool:
        """Alive, this Python, in the service's folder, running `worker <service>`."""
        if not process_is(pid, _PYTHON_BINARY, self.workdir(service)):
            return False
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"worker" in argv and service.encode() in argv

    def running_pid(self, service: str) -> int | None:
        """The pid in the service's pidfile if that process is alive and ours (whoever started it)."""
        return read_pidfile(self.pidfile(service), lambda pid: self.is_ours(service, pid))

    # -- start -------------------------------------------------------------------------

    def start(self, timeout: float = 180.0) -> None:
        """Start every service and wait until each answers /health with 200.

        Raises FleetError, naming the services that failed with their log tails, if one
        is already running, a port is taken, or a service exits or stays unhealthy for
        `timeout` seconds; everything this call started is stopped again first.
        """
        with locked(self.home / "run" / "services" / "fleet.lock"):
            running = {s: pid for s in self.services if (pid := self.running_pid(s)) is not None}
            if running:
                raise FleetError(
                    "already running from this home: "
                    + ", ".join(f"{s} (pid {pid})" for s, pid in running.items())
                    + "\n`posttrade down` stops them."
                )
            self._check_ports(self.services)
            started = []
            try:
                for service in self.services:
                    self._spawn(service)
                    started.append(service)
                failures = self._wait_healthy(self.services, timeout)
            except BaseException:
                # Ctrl-C (or any error) half way: leave nothing behind.
                self._stop_locked(started)
                raise
            if failures:
                message = self._failure_report(failures)
                self._stop_locked(started)
                raise FleetError(message)

    def restart(self, service: str, timeout: float = 180.0) -> None:
        """Start one service of this fleet again (after it exited) and wait for its health."""
        if service not in self.services:
            raise FleetError(f"{service} is not in this fleet")
        with locked(self.home / "run" / "services" / "fleet.lock"):
            proc = self._procs.get(service)
            if proc is not None and proc.poll() is None:
                raise FleetError(f"{service} is running (pid {proc.pid})")
            self._check_ports([service])
            self._spawn(service)
            failures = self._wait_healthy([service], timeout)
            if failures:
                message = self._failure_report(failures)
                # Not a deliberate stop: crashed() lists it again, so a supervisor's
                # back-off and crash-loop accounting see the failed restart.
                self._stop_locked([service], deliberate=False)
                raise FleetError(message)

    def _check_ports(self, services: Sequence[str]) -> None:
        taken = [
            f"{HOST}:{port} ({service} {label}, {_service_var(service, 'METRICS_PORT' if label == 'metrics' else 'PORT')})"
            for service in services
            for label, port in self._ports_of(service).items()
            if port_in_use(HOST, port)
        ]
        if taken:
            raise FleetError(
                "port(s) already in use by processes this fleet did not start:\n  "
                + "\n  ".join(taken)
                + "\nStop them, or choose other ports through the variables named above."
            )

    def _spawn(self, service: str) -> None:
        argv = [sys.executable, "-m", "posttrade.cli", "worker", service]
        log = self.log_path(service)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.workdir(service).mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} posttrade fleet: {' '.join(argv)}\n".encode())
            out.flush()
            # A session of its own: a Ctrl-C in the terminal reaches the supervising
            # process only, which then stops the services in order.
            proc = subprocess.Popen(
                argv, cwd=self.workdir(service), env=self._env[service], stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._procs[service] = proc
        self._stopped.discard(service)
        write_pidfile(self.pidfile(service), proc.pid)

    def _wait_healthy(self, services: Sequence[str], timeout: float) -> dict[str, str]:
        """Poll each service's /health until 200; returns why the others did not get there."""
        pending, failures = list(services), {}
        last_answer: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=HEALTH_REQUEST_TIMEOUT_S) as client:
            while pending:
                if self._stopping.is_set():
                    failures.update({service: "start-up interrupted by a stop" for service in pending})
                    break
                for service in list(pending):
                    proc = self._procs[service]
                    if proc.poll() is not None:
                        failures[service] = f"exited with code {proc.returncode} during start-up"
                    else:
                        try:
                            token = self._health_tokens.get(service)
                            headers = {"Authorization": f"Bearer {token}"} if token else {}
                            response = client.get(f"{self.urls()[service]}/health", headers=headers)
                        except httpx.HTTPError as exc:
                            last_answer[service] = f"no answer ({type(exc).__name__})"
                        else:
                            if response.status_code == 200:
                                pending.remove(service)
                                continue
                            last_answer[service] = f"/health answered {response.status_code}: {response.text[:500]}"
                        if time.monotonic() < deadline:
                            continue
                        failures[service] = f"not healthy after {timeout:.0f} s; last: {last_answer[service]}"
                    pending.remove(service)
                if failures:
                    break  # the start has failed: no point waiting for the others
                if pending:
                    time.sleep(0.25)
        return failures

    def _failure_report(self, failures: Mapping[str, str]) -> str:
        # The log tails are read before stopping: a stop appends shutdown lines.
        return "\n\n".join(
            f"{service} {why}; last lines of {self.log_path(service)}:\n{self.log_tail(service)}"
            for service, why in failures.items()
        )

    # -- watch -------------------------------------------------------------------------

    def crashed(self) -> list[tuple[str, int, str]]:
        """(service, returncode, log tail) of the services this fleet started that exited
        without being stopped; a service is listed until it is restarted."""
        out = []
        for service, proc in self._procs.items():
            if service not in self._stopped and proc.poll() is not None:
                out.append((service, proc.returncode, self.log_tail(service)))
        return out

    def pids(self) -> dict[str, int | None]:
        """Each service's pid while it runs (started here, or found through its pidfile)."""
        out: dict[str, int | None] = {}
        for service in self.services:
            proc = self._procs.get(service)
            if proc is not None:
                out[service] = proc.pid if proc.poll() is None else None
            else:
                out[service] = self.running_pid(service)
        return out

    # -- stop --------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM the services this fleet started, wait, SIGKILL those still running after
        the grace period. Services another process started from the same home are left
        alone (`stop_services(adopt=True)`, what `posttrade down` does, stops those too)."""
        self.stop_services()

    def stop_services(self, grace: float = STOP_TIMEOUT, *, adopt: bool = False) -> list[StopResult]:
        """`stop()`, returning what happened to each service. `adopt`: also stop the
        services of this home that another process started, found through their pidfiles."""
        self._stopping.set()
        try:
            with locked(self.home / "run" / "services" / "fleet.lock"):
                return self._stop_locked(self.services, grace, adopt=adopt)
        finally:
            self._stopping.clear()

    def _stop_locked(
        self, services: Sequence[str], grace: float = STOP_TIMEOUT, deliberate: bool = True, adopt: bool = False
    ) -> list[StopResult]:
        pids: dict[str, int | None] = {}
        for service in services:
            if deliberate:
                self._stopped.add(service)
            proc = self._procs.get(service)
            if proc is not None and proc.poll() is None and self.is_ours(service, proc.pid):
                pids[service] = proc.pid
            else:
                pids[service] = self.running_pid(service) if adopt else None
        outcomes = terminate(pids, self.is_ours, grace=grace)
        results = []
        for service, pid in pids.items():
            if outcomes[service] != "still running":
                if self.running_pid(service) is None:  # never remove another live fleet's pidfile
                    self.pidfile(service).unlink(missing_ok=True)
                proc = self._procs.get(service)
                if proc is not None and proc.pid == pid:
                    proc.wait(timeout=5)  # our child: reap it ourselves
                elif pid is not None:
                    wait_reaped(pid)
            results.append(StopResult(service, pid, outcomes[service]))
        return results


def service_section(service: str, env: Mapping[str, str]) -> dict:
    """The `service:` section the service will load: its YAML with the env overrides.

    Read here without the service's schema (importing six services' code to read two
    numbers would cost seconds); the service itself validates everything when it starts.
    """
    config_dir = Path(env.get("POSTTRADE_CONFIG_DIR") or default_config_dir())
    path = config_dir / service / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FleetError(f"{service}: cannot read its config {path}: {exc}") from None
    try:
        apply_env_overrides(data, service, env)
    except ConfigError as exc:
        raise FleetError(f"{service}: {exc}") from None
    section = data.get("service")
    if not isinstance(section, dict):
        raise FleetError(f"{service}: {path} has no `service:` section")
    return section


__all__ = ["SERVICES", "FleetError", "ServiceFleet", "service_section"]
