"""Where the local stack lives: its data folder and the ports of its servers.

One place reads the environment, so `posttrade stack`, the services' config overrides,
the integration tests and the benchmarks always agree on the same addresses.

NATS runs as one server (`nats`) or as a cluster of `nats_cluster` nodes (`nats-1`,
`nats-2`, ...): node i (from 0) listens on the configured client, monitor and route
ports + i, and keeps its data in a folder of its own.

SeaweedFS (object storage) refuses anonymous requests: its one S3 identity is generated
for each home on first use and kept in the gateway's identity file under the home, from
where `service_env()` hands it to the services.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

# Loopback only: the stack is for one developer machine or one CI job, never a network.
HOST = "127.0.0.1"

# Endpoints field -> environment variable that overrides its default.
PORT_ENV = {
    "nats_port": "POSTTRADE_STACK_NATS_PORT",
    "nats_monitor_port": "POSTTRADE_STACK_NATS_MONITOR_PORT",
    "nats_cluster_port": "POSTTRADE_STACK_NATS_CLUSTER_PORT",
    "valkey_port": "POSTTRADE_STACK_VALKEY_PORT",
    "questdb_http_port": "POSTTRADE_STACK_QUESTDB_HTTP_PORT",
    "questdb_pg_port": "POSTTRADE_STACK_QUESTDB_PG_PORT",
    "questdb_ilp_port": "POSTTRADE_STACK_QUESTDB_ILP_PORT",
    "seaweedfs_s3_port": "POSTTRADE_STACK_SEAWEEDFS_S3_PORT",
    "seaweedfs_s3_grpc_port": "POSTTRADE_STACK_SEAWEEDFS_S3_GRPC_PORT",
    "seaweedfs_master_port": "POSTTRADE_STACK_SEAWEEDFS_MASTER_PORT",
    "seaweedfs_master_grpc_port": "POSTTRADE_STACK_SEAWEEDFS_MASTER_GRPC_PORT",
    "seaweedfs_volume_port": "POSTTRADE_STACK_SEAWEEDFS_VOLUME_PORT",
    "seaweedfs_volume_grpc_port": "POSTTRADE_STACK_SEAWEEDFS_VOLUME_GRPC_PORT",
    "seaweedfs_filer_port": "POSTTRADE_STACK_SEAWEEDFS_FILER_PORT",
    "seaweedfs_filer_grpc_port": "POSTTRADE_STACK_SEAWEEDFS_FILER_GRPC_PORT",
}
HOME_ENV = "POSTTRADE_HOME"
NATS_CLUSTER_ENV = "POSTTRADE_STACK_NATS_CLUSTER"
NATS_CLUSTER_SIZES = (1, 3, 5)  # JetStream's replicated groups want an odd number of nodes
# What a clustered stack's services use, for 3 nodes and for 5: a stream survives one
# node's loss (R5 would add two copies to every write to survive a second loss as well).
CLUSTER_REPLICAS = 3
# Written by `up` while a cluster runs, so `env`, `status` and `down` find its layout
# without being told again.
NATS_CLUSTER_FILE = "run/nats-cluster"
# The bucket the services' configs name (storage.seaweedfs.bucket); `up` creates it.
SEAWEEDFS_BUCKET = "trader2025"
# SeaweedFS's S3 identity file (`weed server -s3.config`), in its folder under the home.
SEAWEEDFS_IDENTITY_FILE = "seaweedfs/s3-identities.json"


@dataclass(frozen=True)
class NatsNode:
    name: str  # its data folder, pidfile and log: "nats" alone, "nats-1" ... in a cluster
    client_port: int
    monitor_port: int
    cluster_port: int | None  # the route port; None for a lone server

    @property
    def server_name(self) -> str:
        return "posttrade_local" + self.name[len("nats"):].replace("-", "_")


@dataclass(frozen=True)
class Endpoints:
    home: Path
    nats_port: int = 4222
    nats_monitor_port: int = 8222
    nats_cluster_port: int = 6222  # only used by a cluster: its nodes' routes
    valkey_port: int = 6379
    questdb_http_port: int = 9000
    questdb_pg_port: int = 8812
    questdb_ilp_port: int = 9009
    # SeaweedFS's own defaults for the S3 gateway, master and filer; the volume server's
    # 8080 is the port most likely taken on a developer's machine, so it moves next to S3.
    # Each gRPC port is set too: SeaweedFS's default (HTTP port + 10000) is no port at all
    # for an HTTP port above 55535.
    seaweedfs_s3_port: int = 8333
    seaweedfs_s3_grpc_port: int = 18333
    seaweedfs_master_port: int = 9333
    seaweedfs_master_grpc_port: int = 19333
    seaweedfs_volume_port: int = 8380
    seaweedfs_volume_grpc_port: int = 18380
    seaweedfs_filer_port: int = 8888
    seaweedfs_filer_grpc_port: int = 18888
    host: str = HOST
    nats_cluster: int = 1  # NATS nodes

    def __post_init__(self) -> None:
        if self.nats_cluster not in NATS_CLUSTER_SIZES:
            raise ValueError(f"{NATS_CLUSTER_ENV}={self.nats_cluster}: a NATS cluster has 1, 3 or 5 nodes")
        listening = self._listening()
        for port, variable in listening:
            if not 0 < port < 65536:
                raise ValueError(f"{variable}={port} is not a TCP port")
        ports = [port for port, _ in listening]
        if len(set(ports)) != len(ports):
            raise ValueError(f"two servers of the stack would share a port: {listening}")

    def port_variables(self) -> dict[int, str]:
        """Every port the stack listens on -> the variable (and node offset) that sets it."""
        return dict(self._listening())

    def _listening(self) -> list[tuple[int, str]]:
        ports = [(getattr(self, name), var) for name, var in PORT_ENV.items() if not name.startswith("nats_")]
        fields = {"client_port": "nats_port", "monitor_port": "nats_monitor_port", "cluster_port": "nats_cluster_port"}
        for i, node in enumerate(self.nats_nodes):
            for attribute, field in fields.items():
                port = getattr(node, attribute)
                if port is not None:
                    ports.append((port, PORT_ENV[field] + (f" + {i}" if i else "")))
        return ports

    @property
    def nats_nodes(self) -> tuple[NatsNode, ...]:
        if self.nats_cluster == 1:
            return (NatsNode("nats", self.nats_port, self.nats_monitor_port, None),)
        return tuple(
            NatsNode(f"nats-{i + 1}", self.nats_port + i, self.nats_monitor_port + i, self.nats_cluster_port + i)
            for i in range(self.nats_cluster)
        )

    def nats_node(self, name: str) -> NatsNode:
        for node in self.nats_nodes:
            if node.name == name:
                return node
        raise ValueError(f"this stack has no NATS node {name!r} (its NATS runs as {self.nats_cluster} node(s))")

    @property
    def nats_urls(self) -> list[str]:
        return [f"nats://{self.host}:{node.client_port}" for node in self.nats_nodes]

    # The host is the same for every server; the per-server names read better at call sites.
    @property
    def valkey_host(self) -> str:
        return self.host

    @property
    def questdb_host(self) -> str:
        return self.host

    @property
    def nats_url(self) -> str:
        """Every node's URL, comma-separated: what `nats.url` takes from the environment."""
        return ",".join(self.nats_urls)

    @property
    def nats_replicas(self) -> int:
        return 1 if self.nats_cluster == 1 else CLUSTER_REPLICAS

    @property
    def questdb_http_url(self) -> str:
        return f"http://{self.host}:{self.questdb_http_port}"

    @property
    def chdb_dir(self) -> Path:
        """Parent of the embedded ClickHouse data paths; each service appends its own name."""
        return self.home / "chdb"

    @property
    def seaweedfs_url(self) -> str:
        """SeaweedFS's S3 endpoint."""
        return f"http://{self.host}:{self.seaweedfs_s3_port}"

    @property
    def seaweedfs_identity_file(self) -> Path:
        return self.home / SEAWEEDFS_IDENTITY_FILE

    def seaweedfs_credentials(self) -> tuple[str, str]:
        """(access key, secret key) of the one S3 identity of this home's SeaweedFS.

        Generated on first use (by `up`, or by whoever asks first) and kept in the identity
        file the gateway reads, readable by the owner only: never in the repository, and
        never the same for two homes."""
        path = self.seaweedfs_identity_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            identities = {
                "identities": [{
                    "name": "posttrade",
                    # A letter first: the services read these from the environment as
                    # YAML, where a key of digits alone would come out as a number.
                    "credentials": [{"accessKey": "PT" + secrets.token_hex(9).upper(),
                                     "secretKey": "pt" + secrets.token_urlsafe(30)}],
                    # Admin: the services create the bucket when it is missing.
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }]
            }  # fmt: skip
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(identities, out, indent=2)
            try:
                os.link(tmp, path)  # never replaces: two first users agree on the first file
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        try:
            [credential] = json.loads(path.read_text())["identities"][0]["credentials"]
            return credential["accessKey"], credential["secretKey"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"{path} is not the stack's SeaweedFS identity file: remove it to get a new one") from None

    def object_storage_env(self) -> dict[str, str]:
        """The config overrides that point the services at this stack's SeaweedFS."""
        access_key, secret_key = self.seaweedfs_credentials()
        return {
            "POSTTRADE__STORAGE__SEAWEEDFS__ENDPOINT": self.seaweedfs_url,
            "POSTTRADE__STORAGE__SEAWEEDFS__BUCKET": SEAWEEDFS_BUCKET,
            "POSTTRADE__STORAGE__SEAWEEDFS__ACCESS_KEY": access_key,
            "POSTTRADE__STORAGE__SEAWEEDFS__SECRET_KEY": secret_key,
        }

    def service_env(self, seaweedfs: Endpoints | None = None) -> dict[str, str]:
        """The config overrides that point the six services at this stack.

        `seaweedfs`: the stack whose SeaweedFS identity the services use, when its server
        was started from another home than this one. Default: this one when its home has
        an identity (its SeaweedFS was started from it), else the environment's stack: a
        home made for a server of its own (a private NATS) shares the suite's SeaweedFS."""
        if seaweedfs is None and not self.seaweedfs_identity_file.exists():
            seaweedfs = endpoints()
        return {
            "POSTTRADE__NATS__URL": self.nats_url,
            "POSTTRADE__NATS__REPLICAS": str(self.nats_replicas),
            "POSTTRADE__DATABASES__QUESTDB__HOST": self.questdb_host,
            "POSTTRADE__DATABASES__QUESTDB__PORT": str(self.questdb_http_port),
            "POSTTRADE__DATABASES__QUESTDB__PG_PORT": str(self.questdb_pg_port),
            "POSTTRADE__DATABASES__QUESTDB__ILP_PORT": str(self.questdb_ilp_port),
            "POSTTRADE__CACHE__REDIS__HOST": self.valkey_host,
            "POSTTRADE__CACHE__REDIS__PORT": str(self.valkey_port),
            "POSTTRADE__DATABASES__CLICKHOUSE__DSN": f"chdb://{self.chdb_dir}",
            **(seaweedfs or self).object_storage_env(),
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
    if environ.get(NATS_CLUSTER_ENV):
        try:
            values["nats_cluster"] = int(environ[NATS_CLUSTER_ENV])
        except ValueError:
            raise ValueError(f"{NATS_CLUSTER_ENV}={environ[NATS_CLUSTER_ENV]!r} is not a number of nodes") from None
    known = {f.name for f in fields(Endpoints)}
    for name, value in overrides.items():
        if name not in known:
            raise TypeError(f"unknown endpoint setting {name!r}")
        if value is not None:
            values[name] = value
    # Absolute, because the servers run with their own data folder as working directory.
    values["home"] = home = Path(values["home"]).expanduser().absolute()  # type: ignore[arg-type]
    if "nats_cluster" not in values:
        values["nats_cluster"] = running_cluster_size(home)
    return Endpoints(**values)  # type: ignore[arg-type]


def running_cluster_size(home: Path) -> int:
    """The NATS nodes `up` last started under `home` (1 when no cluster was started)."""
    try:
        return int((home / NATS_CLUSTER_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return 1


__all__ = [
    "CLUSTER_REPLICAS",
    "HOME_ENV",
    "HOST",
    "NATS_CLUSTER_ENV",
    "NATS_CLUSTER_FILE",
    "PORT_ENV",
    "SEAWEEDFS_BUCKET",
    "SEAWEEDFS_IDENTITY_FILE",
    "Endpoints",
    "NatsNode",
    "endpoints",
    "running_cluster_size",
]
