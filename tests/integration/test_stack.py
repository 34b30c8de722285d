"""The local stack: every server answers a real request, and the CLI's whole lifecycle."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
import nats
import redis

from posttrade import stack as local_stack
from posttrade.stack.supervisor import port_in_use
from posttrade.stores.objects import S3ObjectStore

REPO = Path(__file__).resolve().parents[2]


async def test_nats_has_jetstream(stack: local_stack.Endpoints) -> None:
    client = await nats.connect(stack.nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        info = await client.jetstream().account_info()
    finally:
        await client.close()
    assert info.limits is not None  # an account answer, i.e. JetStream is enabled


def test_valkey_set_get(stack: local_stack.Endpoints) -> None:
    client = redis.Redis(host=stack.valkey_host, port=stack.valkey_port, socket_timeout=5)
    key = f"posttrade:test:{uuid.uuid4().hex}"
    try:
        assert client.set(key, "42", ex=60)
        assert client.get(key) == b"42"
    finally:
        client.delete(key)
        client.close()


def test_questdb_answers_sql_over_http(stack: local_stack.Endpoints) -> None:
    response = httpx.get(f"{stack.questdb_http_url}/exec", params={"query": "select 1"}, timeout=10)
    assert response.status_code == 200
    assert response.json()["dataset"] == [[1]]


def test_chdb_select_1_through_clickhouse_connect(tmp_path: Path) -> None:
    # In a child process: chdb allows one data path per process, and other tests of this
    # session may own theirs.
    code = (
        "import sys, clickhouse_connect\n"
        "client = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1])\n"
        "print(client.query('SELECT 1').result_rows)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "chdb")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[(1,)]"


def test_seaweedfs_takes_signed_writes_into_the_services_bucket(stack: local_stack.Endpoints) -> None:
    env = stack.service_env()
    store = S3ObjectStore(
        endpoint=env["POSTTRADE__STORAGE__SEAWEEDFS__ENDPOINT"], bucket=env["POSTTRADE__STORAGE__SEAWEEDFS__BUCKET"],
        access_key=env["POSTTRADE__STORAGE__SEAWEEDFS__ACCESS_KEY"],
        secret_key=env["POSTTRADE__STORAGE__SEAWEEDFS__SECRET_KEY"],
    )  # fmt: skip
    name = f"posttrade-test/{uuid.uuid4().hex}"
    try:
        store.put_sync(name, b"42")
        assert store.get_sync(name) == b"42"
    finally:
        store.delete_sync(name)
        store.close_sync()
    # Its identity is the home's own, in a file no other user can read.
    assert stack.seaweedfs_identity_file.is_relative_to(stack.home)
    assert stack.seaweedfs_identity_file.stat().st_mode & 0o077 == 0


def test_a_restarted_seaweedfs_keeps_its_objects_and_its_identity(tmp_path: Path) -> None:
    home = tmp_path / "home"
    names = [field for field in local_stack.PORT_ENV if field.startswith("seaweedfs_")]
    ep = local_stack.endpoints({local_stack.HOME_ENV: str(home)}, **dict(zip(names, _free_ports(len(names)))))
    try:
        [state] = local_stack.up(ep, names=["seaweedfs"])
        assert state.started and state.healthy  # healthy: the probe object was written
        credentials = ep.seaweedfs_credentials()
        store = S3ObjectStore(endpoint=ep.seaweedfs_url, bucket=local_stack.SEAWEEDFS_BUCKET,
                              access_key=credentials[0], secret_key=credentials[1])  # fmt: skip
        store.put_sync("kept/across-restarts.csv", b"a,b\n1,2\n", "text/csv")
        [stopped] = local_stack.down(ep, names=["seaweedfs"])
        assert stopped.outcome == "stopped", stopped  # SeaweedFS's own shutdown, in time

        [state] = local_stack.up(ep, names=["seaweedfs"])
        assert state.started and state.healthy
        assert ep.seaweedfs_credentials() == credentials
        assert store.get_sync("kept/across-restarts.csv") == b"a,b\n1,2\n"
        assert [info.name for info in store.list_sync("")] == ["kept/across-restarts.csv"]  # no probe left over
        store.close_sync()
    finally:
        local_stack.down(ep, names=["seaweedfs"])
    assert _processes_under(home) == []


def _free_ports(count: int) -> list[int]:
    # All bound at once so the kernel hands out distinct ports.
    with ExitStack() as sockets:
        probes = [sockets.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def _pids(home: Path) -> dict[str, int]:
    return {path.stem: int(path.read_text()) for path in (home / "run").glob("*.pid")}


def _processes_under(home: Path) -> list[str]:
    """Every live process whose working directory is inside `home`: what a stack there left."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(home):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name}: {command}")
        except OSError:  # exited meanwhile, or a zombie
            continue
    return found


def _gone(pid: int, timeout: float = 10.0) -> bool:
    # Our servers are children of init, which reaps them a moment after they exit.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


def test_lifecycle_of_an_isolated_stack(tmp_path: Path, stack: local_stack.Endpoints) -> None:
    main_pids = _pids(stack.home)
    home = tmp_path / "home"
    env = {**os.environ, local_stack.HOME_ENV: str(home)}
    env.update(zip(local_stack.PORT_ENV.values(), map(str, _free_ports(len(local_stack.PORT_ENV)))))

    def cli(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "posttrade.cli", "stack", action],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    try:
        started = cli("up")
        assert started.returncode == 0, started.stdout + started.stderr
        pids = _pids(home)
        assert sorted(pids) == ["nats", "questdb", "seaweedfs", "valkey"]
        assert started.stdout.count(" started ") == 4

        assert cli("status").returncode == 0

        again = cli("up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("already running") == 4
        assert _pids(home) == pids

        stopped = cli("down")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert _pids(home) == {}
        assert all(_gone(pid) for pid in pids.values())
        assert _processes_under(home) == []
        assert cli("status").returncode != 0
    finally:
        cli("down")  # never leave a stray stack behind, even after a failed assertion

    assert _pids(stack.home) == main_pids  # the suite's own stack was not touched
    assert all(state.healthy for state in local_stack.status(stack))


def test_a_clustered_stack_is_found_by_env_status_and_down_without_the_flag(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, local_stack.HOME_ENV: str(home)}
    # Every single port free, and each NATS port + 1 and + 2 for the other two nodes.
    ports = iter(_free_ports(len(local_stack.PORT_ENV) * 3))
    for variable in local_stack.PORT_ENV.values():
        while True:
            base = next(ports)
            span = range(base, base + (3 if "NATS" in variable else 1))
            if not any(port_in_use("127.0.0.1", port) for port in span):
                break
        env[variable] = str(base)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "posttrade.cli", "stack", *args],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    try:
        started = cli("up", "--nats-cluster", "3")
        assert started.returncode == 0, started.stdout + started.stderr
        assert sorted(_pids(home)) == ["nats-1", "nats-2", "nats-3", "questdb", "seaweedfs", "valkey"]
        assert cli("status").returncode == 0
        exports = cli("env").stdout
        client = int(env["POSTTRADE_STACK_NATS_PORT"])
        urls = ",".join(f"nats://127.0.0.1:{client + i}" for i in range(3))
        assert f"export POSTTRADE__NATS__URL={urls}" in exports and "POSTTRADE__NATS__REPLICAS=3" in exports
        monitor = int(env["POSTTRADE_STACK_NATS_MONITOR_PORT"])
        routes = httpx.get(f"http://127.0.0.1:{monitor}/routez", timeout=5).json()
        assert {route.get("remote_name") for route in routes["routes"]} == {"posttrade_local_2", "posttrade_local_3"}
        stopped = cli("down")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert _pids(home) == {} and _processes_under(home) == []
        assert "POSTTRADE__NATS__REPLICAS=1" in cli("env").stdout  # the next `up` is one server again
    finally:
        cli("down")
