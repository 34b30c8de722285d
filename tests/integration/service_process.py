"""Run a service as its own process (`posttrade worker <service>`) for integration tests.

Services run as separate processes in production, and chdb allows one data path per
process, so tests do the same: each test gets a service with a unique name (so its
durable consumers, tables and chdb directory are its own) on free ports.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from posttrade.streams.nats import forget_apps

REPO = Path(__file__).resolve().parents[2]


def reference_setting(text: str) -> str:
    """A config line pointing a service at reference data `text` (YAML), written to a
    file of its own: symbols are case-sensitive, so they cannot come from the environment."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="posttrade-reference-"))
    path = folder / "reference.yaml"
    path.write_text(text)
    return f"reference_file: {path}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(self, service: str, stack, tmp_path: Path, config_yaml: str | None = None, env: dict | None = None):
        self.service = service
        self.stack = stack
        self.name = f"{service}_it_{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.log = tmp_path / f"{self.name}.log"
        prefix = f"POSTTRADE_{service.upper()}__"
        self.env = {
            **os.environ,
            **stack.service_env(),
            f"{prefix}SERVICE__NAME": self.name,
            f"{prefix}SERVICE__PORT": str(self.port),
            f"{prefix}SERVICE__HOST": "127.0.0.1",
            # The shared streams hold other tests' history: a fresh test service starts
            # at the end of them (a restarted one resumes where it was).
            f"{prefix}RUNTIME__START_FROM": "new",
            "PYTHONPATH": str(REPO),
            **(env or {}),
        }
        if service == "ptrc":
            self.env[f"{prefix}SERVICE__METRICS_PORT"] = str(free_port())
        self.args = [sys.executable, "-m", "posttrade.cli", "worker", service]
        if config_yaml is not None:
            path = tmp_path / f"{self.name}.yaml"
            path.write_text(config_yaml)
            self.args += ["--config", str(path)]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.service} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()  # a service that never got healthy must not outlive the test
        self.proc.wait(timeout=10)
        raise AssertionError(f"{self.service} not healthy after {timeout}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last commit."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then forget the instance on NATS: a test's service is not resumed
        after it (a restart is kill() and start()), and every durable consumer left on
        the shared streams is work for the server on each message later tests publish."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError(f"{self.service} did not stop on SIGTERM:\n{self.tail()}")
            assert self.proc.returncode == 0, self.tail()
        asyncio.run(forget_apps(self.stack.nats_url, [self.name]))

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def get(self, path: str, **params) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=10)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=60, **kwargs)


# questdb_writer's routes (config/backend/questdb_writer/config.yaml).
WRITER_ROUTES = (
    "market_trades", "quotes", "bars", "fills", "orders",
    "ptrc_trades", "position_snapshots", "pnl_snapshots", "pnl_account_snapshots",
)


def questdb_writer(stack, tmp_path: Path, routes: tuple[str, ...]) -> ServiceProcess:
    """A questdb_writer that writes only `routes` (QuestDB is written by it alone: ptrc's
    blotter and snapshots and pnl's history reach QuestDB through it)."""
    prefix = "POSTTRADE_QUESTDB_WRITER__WRITER__ROUTES__"
    env = {f"{prefix}{route.upper()}__ENABLED": "false" for route in WRITER_ROUTES if route not in routes}
    return ServiceProcess("questdb_writer", stack, tmp_path, env=env)
