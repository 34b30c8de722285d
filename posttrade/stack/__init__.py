"""The local stack: real NATS (JetStream), Valkey, QuestDB and SeaweedFS (S3) servers on 127.0.0.1.

`posttrade stack up|down|status|env` drives it from the shell; tests and benchmarks use
`endpoints()` to find it and `up()` to make sure it runs. ClickHouse is embedded (chdb),
so it is no server here: each process opens its own data path under `Endpoints.chdb_dir`.
"""

from .endpoints import HOME_ENV, NATS_CLUSTER_ENV, PORT_ENV, SEAWEEDFS_BUCKET, Endpoints, NatsNode, endpoints
from .servers import (
    QUESTDB_VERSION,
    SEAWEEDFS,
    Server,
    StackError,
    chdb_version,
    fetch_questdb_jar,
    nats_server,
    stack_servers,
)
from .supervisor import ServerState, StopResult, down, log_tail, logfile, pidfile, status, up

__all__ = [
    "HOME_ENV",
    "NATS_CLUSTER_ENV",
    "PORT_ENV",
    "QUESTDB_VERSION",
    "SEAWEEDFS",
    "SEAWEEDFS_BUCKET",
    "Endpoints",
    "NatsNode",
    "Server",
    "ServerState",
    "StackError",
    "StopResult",
    "chdb_version",
    "down",
    "endpoints",
    "fetch_questdb_jar",
    "log_tail",
    "logfile",
    "nats_server",
    "pidfile",
    "stack_servers",
    "status",
    "up",
]
