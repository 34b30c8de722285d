"""Where the local stack lives: its data folder and the ports of its servers.

One place reads the environment, so `posttrade stack`, the services' config overrides,
the integration tests and the benchmarks always agree on the same addresses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

# Loopback only: the stack is for one developer machine or one CI job, never a network.
HOST = "127.0.0.1"

# Endpoints field -> environment variable that overrides its default.
PORT_ENV = {
    "nats_port": "POSTTRADE_STACK_NATS_PORT",
    "nats_monitor_port": "POSTTRADE_STACK_NATS_MONITOR_PORT",
    "valkey_port": "POSTTRADE_STACK_VALKEY_PORT",
    "questdb_http_port": "POSTTRADE_STACK_QUESTDB_HTTP_PORT",
    "questdb_pg_port": "POSTTRADE_STACK_QUESTDB_PG_PORT",
    "questdb_ilp_port": "POSTTRADE_STACK_QUESTDB_ILP_PORT",
}
HOME_ENV = "POSTTRADE_HOME"


@dataclass(frozen=True)
class Endpoints:
    home: Path
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    valkey_port: int = 6379
    questdb_http_port: int = 9000
    questdb_pg_port: int = 8812
    questdb_ilp_port: int = 9009
    host: str = HOST

    def __post_init__(self) -> None:
        ports = {name: getattr(self, name) for name in PORT_ENV}
        for name, port in ports.items():
            if not 0 < port < 65536:
                raise ValueError(f"{PORT_ENV[name]}={port} is not a TCP port")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"two servers of the stack would share a port: {ports}")

    # The host is the same for every server; the per-server names read better at call sites.
    @property
    def valkey_host(self) -> str:
        return self.host

    @property
    def questdb_host(self) -> str:
        return self.host

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.nats_port}"

    @property
    def questdb_http_url(self) -> str:
        return f"http://{self.host}:{self.questdb_http_port}"

    @property
    def chdb_dir(self) -> Path:
        """Parent of the embedded ClickHouse data paths; each service appends its own name."""
        return self.home / "chdb"

    @property
    def objects_dir(self) -> Path:
        return self.home / "objects"

    def service_env(self) -> dict[str, str]:
        """The config overrides that point the six services at this stack."""
        return {
            "POSTTRADE__NATS__URL": self.nats_url,
            "POSTTRADE__DATABASES__QUESTDB__HOST": self.questdb_host,
            "POSTTRADE__DATABASES__QUESTDB__PORT": str(self.questdb_http_port),
            "POSTTRADE__DATABASES__QUESTDB__PG_PORT": str(self.questdb_pg_port),
            "POSTTRADE__DATABASES__QUESTDB__ILP_PORT": str(self.questdb_ilp_port),
            "POSTTRADE__CACHE__REDIS__HOST": self.valkey_host,
            "POSTTRADE__CACHE__REDIS__PORT": str(self.valkey_port),
            "POSTTRADE__STORAGE__LOCAL_DIR": str(self.objects_dir),
            "POSTTRADE__DATABASES__CLICKHOUSE__DSN": f"chdb://{self.chdb_dir}",
        }


def endpoints(environ: Mapping[str, str] | None = None, **overrides: object) -> Endpoints:
    """The stack's endpoints from the environment; keyword overrides (e.g. CLI flags) win.

    Overrides that are None are ignored, so argparse results can be passed through as they are.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {"home": Path(environ.get(HOME_ENV) or ".posttrade")}
    for name, var in PORT_ENV.items():
        if environ.get(var):
            try:
                values[name] = int(environ[var])
            except ValueError:
                raise ValueError(f"{var}={environ[var]!r} is not a port number") from None
    known = {f.name for f in fields(Endpoints)}
    for name, value in overrides.items():
        if name not in known:
            raise TypeError(f"unknown endpoint setting {name!r}")
        if value is not None:
            values[name] = value
    # Absolute, because the servers run with their own data folder as working directory.
    values["home"] = Path(values["home"]).expanduser().absolute()  # type: ignore[arg-type]
    return Endpoints(**values)  # type: ignore[arg-type]


__all__ = ["HOME_ENV", "HOST", "PORT_ENV", "Endpoints", "endpoints"]
