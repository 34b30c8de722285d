"""The whole pipeline as `posttrade up` runs it: the six services as processes (a
ServiceFleet on free ports) and the demo feed, on the real servers; data reaches every
service, a crashed service is reported and restarted, and nothing outlives stop() or
`posttrade down` from another process.

The services get names of their own (durable consumers, tables, chdb directories) and
start at the end of the shared streams; the feed's symbols and accounts carry a tag, so
nothing here mixes with other tests' data.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
import nats
import pytest

from posttrade.demo.feed import ACCOUNTS, DemoFeed, FeedSettings
from posttrade.stack.fleet import SERVICES, FleetError, ServiceFleet
from posttrade.stack.supervisor import port_in_use
from posttrade.streams.nats import NatsTransport

REPO = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> list[int]:
    # All bound at once so the kernel hands out distinct ports.
    with ExitStack() as sockets:
        probes = [sockets.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def fleet_env(services, tag: str) -> tuple[dict[str, str], dict[str, int]]:
    """Per-service names, start at the streams' end, free ports (ptrc's metrics port too)."""
    ports = free_ports(len(services) + 1)
    env = {"POSTTRADE_PTRC__SERVICE__METRICS_PORT": str(ports[-1])}
    for service in services:
        prefix = f"POSTTRADE_{service.upper()}__"
        env[f"{prefix}SERVICE__NAME"] = f"{service}_up_{tag}"
        env[f"{prefix}RUNTIME__START_FROM"] = "new"
    return env, dict(zip(services, ports))


def processes_under(home: Path) -> list[str]:
    """Every live process whose working directory is inside `home`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd == home or home in cwd.parents:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {argv}")
    return found


def error_lines(fleet: ServiceFleet) -> list[str]:
    lines = []
    for service in fleet.services:
        for line in fleet.log_path(service).read_text(errors="replace").splitlines():
            if " ERROR " in line or line.startswith("Traceback"):
                lines.append(f"{service}: {line}")
    return lines


async def forget_names(nats_url: str, prefix_list: list[str]) -> None:
    """Delete the durable consumers and table buckets these services left on the shared NATS."""
    client = await nats.connect(nats_url)
    js = client.jetstream()

    async def every(listing) -> list:  # the server answers in pages
        found: list = []
        while page := await listing(len(found)):
            found.extend(page)
        return found

    try:
        for stream in await every(js.streams_info):
            name = stream.config.name
            if name.startswith("KV_"):  # a table's changelog bucket: no consumers of ours
                if any(name[3:].startswith(p) for p in prefix_list):
                    await js.delete_stream(name)
                continue
            for consumer in await every(lambda offset: js.consumers_info(name, offset)):
                if any(consumer.name.startswith(p) for p in prefix_list):
                    await js.delete_consumer(name, consumer.name)
    finally:
        await client.close()


def wait_for(what: str, check, timeout: float = 90.0, fleet: ServiceFleet | None = None):
    """Poll `check()` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    tails = "" if fleet is None else "\n".join(f"--- {s}\n{fleet.log_tail(s)}" for s in fleet.services)
    raise AssertionError(f"{what}: not after {timeout:.0f} s (last: {last!r})\n{tails}")


def get(url: str, **params):
    return httpx.get(url, params=params, timeout=10, trust_env=False)


@pytest.fixture
def tag() -> str:
    return "U" + uuid.uuid4().hex[:6].upper()


def test_the_pipeline_runs_and_stops_leaving_nothing_behind(stack, tmp_path, tag):
    home = tmp_path / "home"
    env, ports = fleet_env(SERVICES, tag)
    fleet = ServiceFleet(home, env=env, ports=ports)
    accounts = [f"{a.name}-{tag}" for a in ACCOUNTS]
    pids: dict[str, int] = {}
    try:
        fleet.start(timeout=240)
        pids = {s: p for s, p in fleet.pids().items() if p is not None}
        assert set(pids) == set(SERVICES)
        urls = fleet.urls()
        assert urls == {s: f"http://127.0.0.1:{ports[s]}" for s in SERVICES}
        for service in SERVICES:
            assert fleet.pidfile(service).read_text().strip() == str(pids[service])

        settings = FeedSettings(rate=200, seed=42, tag=tag)
        progress = asyncio.run(DemoFeed(NatsTransport(stack.nats_url, name="test-up-feed"), settings).run(15))
        assert progress.published["fills"] > 0 and progress.published["orders"] > 0

        for service, url in urls.items():
            assert get(f"{url}/health").status_code == 200, (service, get(f"{url}/health").text)

        def positions():
            rows = {a: get(f"{urls['ptrc']}/positions", account=a).json()["positions"] for a in accounts}
            return rows if all(rows.values()) else None

        assert all(row["symbol"].endswith(f"-{tag}") for rows in wait_for("ptrc positions", positions, fleet=fleet).values() for row in rows)
        wait_for("pnl values them", lambda: get(f"{urls['pnl']}/pnl/realtime", account=accounts[0]).json()["positions"], fleet=fleet)
        wait_for("questdb_writer rows", lambda: get(f"{urls['questdb_writer']}/stats").json()["totals"]["rows"] > 0, fleet=fleet)
        wait_for(
            "execution_quality rows",
            lambda: get(f"{urls['execution_quality']}/metrics/execution", account=accounts[0]).json()["rows"],
            fleet=fleet,
        )
        quote = wait_for("hot_cache quote", lambda: get(f"{urls['hot_cache']}/quotes/AAPL-{tag}").json(), fleet=fleet)
        assert quote["hit"] is True and quote["quote"]["symbol"] == f"AAPL-{tag}"
        views = {v["view"]: v for v in get(f"{urls['feast_pipeline']}/features/status").json()["views"]}
        assert views["account_features"]["rows_pushed"] > 0
        assert error_lines(fleet) == []

        # A service that dies is reported with its log tail, and comes back on restart().
        os.kill(pids["hot_cache"], signal.SIGKILL)
        [(service, code, tail)] = wait_for("the crash reported", fleet.crashed)
        assert (service, code) == ("hot_cache", -signal.SIGKILL) and "serving on" in tail
        fleet.restart("hot_cache")
        assert fleet.crashed() == []
        assert get(f"{urls['hot_cache']}/health").status_code == 200
        pids["hot_cache"] = fleet.pids()["hot_cache"]
    finally:
        fleet.stop()
        asyncio.run(forget_names(stack.nats_url, [f"{s}_up_{tag}" for s in SERVICES]))

    assert fleet.crashed() == []  # stopped on purpose is no crash
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids.values())
    assert processes_under(home) == []
    assert not list((home / "run" / "services").glob("*.pid"))
    assert not [port for port in ports.values() if port_in_use("127.0.0.1", port)]


FLEET_SCRIPT = """\
import json, sys, time
from pathlib import Path
from posttrade.stack.fleet import ServiceFleet
fleet = ServiceFleet(Path(sys.argv[1]), env=json.loads(sys.argv[2]), services=["questdb_writer", "hot_cache"],
                     ports=json.loads(sys.argv[3]))
fleet.start(timeout=240)
print(json.dumps(fleet.pids()), flush=True)
time.sleep(3600)
"""


def test_posttrade_down_stops_a_fleet_another_process_started(stack, tmp_path, tag):
    home = tmp_path / "home"
    services = ["questdb_writer", "hot_cache"]
    env, ports = fleet_env(services, tag)
    script = tmp_path / "fleet.py"
    script.write_text(textwrap.dedent(FLEET_SCRIPT))
    starter = subprocess.Popen(
        [sys.executable, str(script), str(home), json.dumps(env), json.dumps(ports)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = starter.stdout.readline()
        assert line, starter.stderr.read()
        pids = json.loads(line)
        assert all(pids[s] for s in services)
        # Another fleet on this home finds them through the pidfiles and refuses to start
        # them twice; its stop() leaves alone what it did not start.
        other = ServiceFleet(home, env=env, services=services, ports=ports)
        with pytest.raises(FleetError, match="already running from this home"):
            other.start(timeout=10)
        other.stop()
        assert other.pids() == pids

        down = subprocess.run(
            [sys.executable, "-m", "posttrade.cli", "down", "--home", str(home)],
            cwd=REPO, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert down.returncode == 0, down.stdout + down.stderr
        said = dict(line.split(": ", 1) for line in down.stdout.splitlines() if ": " in line)
        for service in services:
            assert said[service] == f"stopped (pid {pids[service]})"
        for service in set(SERVICES) - set(services):
            assert said[service] == "not running"
        # This home has no stack of its own: its `down` touches no server (the shared
        # stack's pidfiles are under another home).
        assert said["nats"] == said["valkey"] == said["questdb"] == "not running"
        assert get(f"{stack.questdb_http_url}/exec", query="select 1").status_code == 200

        deadline = time.monotonic() + 10
        while processes_under(home) and time.monotonic() < deadline:  # zombies until the starter reaps
            time.sleep(0.2)
        assert all(not _alive(pid) for pid in pids.values())
        assert not list((home / "run" / "services").glob("*.pid"))
    finally:
        starter.kill()
        starter.wait(timeout=10)
        asyncio.run(forget_names(stack.nats_url, [f"{s}_up_{tag}" for s in services]))


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it has stopped running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
