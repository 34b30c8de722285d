"""The services on a 3-node NATS cluster, its streams and consumers at R3.

The cluster is this module's own: three `nats-server` nodes on free ports under a
temporary home (the rest of the suite shares the single-node stack, which this leaves
alone; QuestDB, Valkey and chdb are the suite's). The failover test SIGKILLs the FILLS
stream's leader and then a follower while fills are being published, restarts each, and
checks that nothing was lost or doubled, that no consumer was recreated below its
position, and that every service is healthy again. It prints what the losses cost (time
to a new leader, to a healthy node and services, the longest publish stall):
docs/deployment.md quotes those numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from posttrade import stack as local_stack
from posttrade.stack.supervisor import port_in_use, running_pid, send_signal, wait_reaped
from posttrade.streams.events import Fill, Quote, encode
from posttrade.streams.nats import NatsPullConsumer, NatsTransport
from posttrade.streams.subjects import fill_subject, quote_subject
from posttrade.streams.transport import ConsumerSpec, StartPosition, StreamSpec

from .service_process import ServiceProcess
from .test_trusted_books import FIELDS, MARKS, cli_rows, ptrc_config, settle

NODES = 3


def _free_run(count: int, taken: set[int]) -> int:
    """A first port of `count` consecutive free ports (cluster node i uses base + i)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 60_000)
        ports = set(range(base, base + count))
        if not ports & taken and not any(port_in_use("127.0.0.1", p) for p in ports):
            taken |= ports
            return base
    raise RuntimeError("no run of free ports found")


@pytest.fixture(scope="module")
def cluster(stack, tmp_path_factory) -> Iterator[local_stack.Endpoints]:
    """Endpoints whose NATS is this module's 3-node cluster and whose other servers are
    the suite's stack: what the services here are pointed at."""
    taken: set[int] = set()
    ep = dataclasses.replace(
        stack,
        home=tmp_path_factory.mktemp("nats-cluster"),
        nats_cluster=NODES,
        nats_port=_free_run(NODES, taken),
        nats_monitor_port=_free_run(NODES, taken),
        nats_cluster_port=_free_run(NODES, taken),
    )
    nodes = [node.name for node in ep.nats_nodes]
    local_stack.up(ep, names=nodes)
    try:
        yield ep
    finally:
        local_stack.down(ep, names=nodes)


def node_of(ep: local_stack.Endpoints, server_name: str) -> local_stack.NatsNode:
    return next(node for node in ep.nats_nodes if node.server_name == server_name)


def kill_node(ep: local_stack.Endpoints, node: local_stack.NatsNode) -> None:
    pid = running_pid(ep, local_stack.nats_server(node.name))
    assert pid is not None, f"{node.name} is not running"
    send_signal(pid, signal.SIGKILL)
    wait_reaped(pid, timeout=10)


def node_healthy(ep: local_stack.Endpoints, node: local_stack.NatsNode) -> bool:
    return local_stack.nats_server(node.name).healthy(ep)


def all_healthy(services: list[ServiceProcess]) -> bool:
    try:
        return all(service.get("/health").status_code == 200 for service in services)
    except httpx.HTTPError:
        return False


async def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds until `predicate()` (sync, run in a thread) holds."""
    began = time.monotonic()
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() - began < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - began


def test_a_consumer_restarted_before_its_first_ack_resumes_where_it_was_created(cluster):
    """The rewind of issue 17: an R3 consumer reports an ack floor of 0 until its first
    acknowledgement, and the restart used to recreate it at 0 + 1."""

    async def scenario() -> None:
        transport = NatsTransport(cluster.nats_url, name="posttrade-it-resume", replicas=NODES)
        await transport.connect()
        stream = f"RESUME_{uuid.uuid4().hex[:8].upper()}"
        try:
            await transport.ensure_stream(StreamSpec(stream, (f"{stream.lower()}.>",)))
            await transport.publish_many([(f"{stream.lower()}.x", b"%d" % i) for i in range(1, 51)])
            spec = ConsumerSpec(stream, durable=f"{stream.lower()}-agent", start=StartPosition(seq=31))
            consumer = NatsPullConsumer(transport, spec)
            await consumer.start()
            first = await consumer.next_batch(5, timeout=10)
            assert [d.seq for d in first] == [31, 32, 33, 34, 35]
            await consumer.close()  # the agent dies before its first acknowledgement
            info = await transport.js.consumer_info(stream, spec.durable)
            assert info.ack_floor.consumer_seq == 0 and info.num_ack_pending >= 5  # (a prefetch may add more)

            again = NatsPullConsumer(transport, spec)
            await again.start()
            resumed = await again.next_batch(5, timeout=10)
            await again.close()
            info = await transport.js.consumer_info(stream, spec.durable)
            assert [d.seq for d in resumed] == [31, 32, 33, 34, 35]
            assert info.config.opt_start_seq == 31
        finally:
            await transport.js.delete_stream(stream)
            await transport.close()

    asyncio.run(scenario())


class Samples:
    """Through the failovers, every 0.2 s: consumer info of every durable consumer of the
    services, and whether each service's /health answers 200."""

    def __init__(self) -> None:
        self.by_consumer: dict[str, list] = {}
        self.health: list[tuple[float, bool]] = []

    async def run(self, transport: NatsTransport, consumers: list[str], services: list[ServiceProcess],
                  stop: asyncio.Event) -> None:  # fmt: skip
        async with httpx.AsyncClient(timeout=1) as http:
            while not stop.is_set():
                for consumer in consumers:
                    stream, name = consumer.split("/", 1)
                    try:
                        info = await transport.js.consumer_info(stream, name, timeout=1)
                    except Exception:  # noqa: BLE001 - no leader during an election: sampled next round
                        continue
                    self.by_consumer.setdefault(consumer, []).append(info)
                healthy = True
                for service in services:
                    try:
                        healthy &= (await http.get(f"{service.url}/health")).status_code == 200
                    except httpx.HTTPError:
                        healthy = False
                self.health.append((time.monotonic(), healthy))
                await asyncio.sleep(0.2)

    def longest_unhealthy(self) -> float:
        """The longest time some service's /health was not 200."""
        longest, since = 0.0, None
        for at, healthy in self.health:
            if not healthy and since is None:
                since = at
            elif healthy and since is not None:
                longest, since = max(longest, at - since), None
        return longest

    def recreated_below_their_position(self) -> list[str]:
        """Every sample where a consumer was delivering, or was recreated to start, below
        the ack floor it had already reached."""
        found = []
        for name, infos in self.by_consumer.items():
            floor = 0  # highest acknowledged stream sequence seen
            created = None
            for info in infos:
                if info.created != created and created is not None and info.config.opt_start_seq is not None:
                    if info.config.opt_start_seq <= floor:
                        found.append(f"{name} recreated at seq {info.config.opt_start_seq} after floor {floor}")
                created = info.created
                if info.delivered.consumer_seq > 0 and info.delivered.stream_seq < floor:
                    found.append(f"{name} delivered seq {info.delivered.stream_seq} after floor {floor}")
                if info.ack_floor.consumer_seq > 0:
                    floor = max(floor, info.ack_floor.stream_seq)
        return found

    def recreations(self) -> int:
        return sum(len({info.created for info in infos}) - 1 for infos in self.by_consumer.values())


class Publisher:
    """Fills with their fill id as message id, one at a time, each retried until stored:
    what a gateway does across a failover. Records the longest wait for a PubAck."""

    def __init__(self, transport: NatsTransport, accounts: list[str]) -> None:
        self.transport = transport
        self.accounts = accounts
        self.published: list[Fill] = []
        self.longest_stall = 0.0
        self.retries = 0
        self._rng = random.Random(17)

    def next_fill(self) -> Fill:
        rng = self._rng
        return Fill(
            ts=time.time_ns(), fill_id=f"cl-{uuid.uuid4().hex}", account=rng.choice(self.accounts),
            symbol=rng.choice(list(MARKS)), side=rng.choice(["BUY", "SELL"]), qty=Decimal(rng.randint(1, 40)),
            price=Decimal(rng.randint(9000, 11000)) / 100, fee=Decimal(rng.randint(0, 100)) / 100,
        )  # fmt: skip

    async def run(self, stop: asyncio.Event, per_second: float = 250) -> None:
        while not stop.is_set():
            fill = self.next_fill()
            began = time.monotonic()
            while True:
                try:
                    subject = fill_subject(fill.account, fill.symbol)
                    await asyncio.wait_for(self.transport.publish(subject, encode(fill), msg_id=fill.fill_id), timeout=5)
                    break
                except Exception:  # noqa: BLE001 - link lost, no leader, no PubAck: the same message again
                    self.retries += 1
                    await asyncio.sleep(0.05)
            self.longest_stall = max(self.longest_stall, time.monotonic() - began)
            self.published.append(fill)
            await asyncio.sleep(max(0.0, 1 / per_second - (time.monotonic() - began)))


async def fills_leader(transport: NatsTransport) -> str | None:
    try:
        return (await asyncio.wait_for(transport.js.stream_info("FILLS"), 1)).cluster.leader
    except Exception:  # noqa: BLE001 - asked during an election
        return None


def test_leader_and_follower_sigkilled_under_load_lose_nothing(cluster, tmp_path):
    tag = uuid.uuid4().hex[:6].upper()
    accounts = [f"CL{tag}{c}" for c in "ABC"]
    ptrc = ServiceProcess("ptrc", cluster, tmp_path, ptrc_config())
    execution_quality = ServiceProcess("execution_quality", cluster, tmp_path)
    services = [ptrc, execution_quality]
    numbers: dict[str, float] = {}

    async def scenario() -> tuple[Publisher, Samples]:
        transport = NatsTransport(cluster.nats_url, name="posttrade-it-cluster", replicas=NODES, request_timeout=2)
        await transport.connect()
        try:
            # ptrc values positions at the last quotes: the same marks as `positions compute`.
            for symbol, mid in MARKS.items():
                quote = Quote(ts=time.time_ns(), symbol=symbol, bid=mid - Decimal("0.01"), ask=mid + Decimal("0.01"))
                await transport.publish(quote_subject(symbol), encode(quote))
            consumers = [name for service in services
                         for kind, name in await transport.app_state(service.name) if kind == "consumer"]  # fmt: skip
            assert sum(name.startswith("FILLS/") for name in consumers) >= 2, consumers
            stream = await transport.js.stream_info("FILLS")
            assert stream.config.num_replicas == NODES and len(stream.cluster.replicas) == NODES - 1

            publisher, samples, stop = Publisher(transport, accounts), Samples(), asyncio.Event()
            tasks = [
                asyncio.create_task(publisher.run(stop)),
                asyncio.create_task(samples.run(transport, consumers, services, stop)),
            ]
            await asyncio.sleep(3)

            for role in ("leader", "follower"):
                placement = (await transport.js.stream_info("FILLS")).cluster
                victim = node_of(cluster, placement.leader if role == "leader" else placement.replicas[0].name)
                killed = time.monotonic()
                kill_node(cluster, victim)
                if role == "leader":

                    async def new_leader() -> bool:
                        found = await fills_leader(transport)
                        return found is not None and found != victim.server_name

                    while not await new_leader():
                        assert time.monotonic() - killed < 30, "no new FILLS leader within 30 s"
                        await asyncio.sleep(0.05)
                    numbers["leader_elected_s"] = time.monotonic() - killed
                await asyncio.sleep(2)  # publishing goes on with one node down
                restarted = time.monotonic()
                await asyncio.to_thread(local_stack.up, cluster, [victim.name])  # returns once it is healthy
                numbers[f"{role}_node_restart_to_healthy_s"] = time.monotonic() - restarted
                await wait_for(lambda: all_healthy(services), 60, "services /health")
                numbers[f"{role}_kill_to_services_healthy_s"] = time.monotonic() - killed
                await asyncio.sleep(2)
            stop.set()
            await asyncio.gather(*tasks)
            numbers["publish_stall_s"] = publisher.longest_stall
            numbers["publish_retries"] = publisher.retries
            numbers["fills"] = len(publisher.published)
            numbers["consumer_recreations"] = samples.recreations()
            numbers["longest_unhealthy_s"] = samples.longest_unhealthy()
            return publisher, samples
        finally:
            await transport.close()

    for service in services:
        service.start()
    try:
        publisher, samples = asyncio.run(scenario())
        published = publisher.published

        # Nothing doubled: the stream holds each fill once, retries included.
        async def stored() -> int:
            transport = NatsTransport(cluster.nats_url, name="posttrade-it-count")
            await transport.connect()
            try:
                return (await transport.stream_state("FILLS")).messages
            finally:
                await transport.close()

        assert asyncio.run(stored()) == len(published)

        # Nothing lost or doubled in the books: ptrc equals `positions compute` over the fills.
        expected = cli_rows(tmp_path, published)

        def ptrc_rows() -> dict:
            return {
                (r["account"], r["symbol"]): r
                for account in accounts for r in ptrc.get("/positions", account=account).json()["positions"]
            }  # fmt: skip

        live = settle(ptrc_rows, expected, FIELDS, "ptrc /positions after the failovers", timeout=60)
        fills_per_position = Counter((fill.account, fill.symbol) for fill in published)
        assert {key: row["fill_count"] for key, row in live.items()} == fills_per_position

        assert samples.by_consumer and all(len(infos) > 20 for infos in samples.by_consumer.values())
        assert samples.recreated_below_their_position() == []
        # A recreated consumer says where it restarted; never at the stream's beginning.
        logs = "".join(service.tail(10**7) for service in services)
        restarts = [int(seq) for seq in re.findall(r"restarting it at seq (\d+)", logs)]
        assert all(seq > 1 for seq in restarts), restarts
        assert all_healthy(services)
    finally:
        print("\ncluster failover:", json.dumps({k: round(v, 2) for k, v in numbers.items()}))
        for service in services:
            service.stop()


def test_a_service_starts_while_its_first_listed_server_is_down(cluster, tmp_path):
    # A service that has run before (its streams, buckets and consumers exist, at R3)
    # restarts while the node listed first is down.
    first, second = cluster.nats_nodes[:2]
    service = ServiceProcess("execution_quality", cluster, tmp_path)
    service.start()
    service.kill()
    kill_node(cluster, first)

    def cluster_settled_without_it() -> bool:
        # "Down", not "just died": JetStream's meta group and every stream the service uses
        # have elected leaders among the others (a start is stream and consumer requests,
        # which time out during an election), and the other nodes pass their health check.
        try:
            jsz = httpx.get(f"http://127.0.0.1:{second.monitor_port}/jsz", timeout=2).json()
        except httpx.HTTPError:
            return False
        meta_leader = jsz.get("meta_cluster", {}).get("leader")
        others_healthy = all(node_healthy(cluster, node) for node in cluster.nats_nodes[1:])
        return meta_leader not in (None, "", first.server_name) and others_healthy

    try:
        asyncio.run(wait_for(cluster_settled_without_it, 30, "the cluster settled without the first node"))
        service.start()
        # Its connections (nats-py's and the lean pull and publish links) are on the others.
        names = [
            connection.get("name", "")
            for node in cluster.nats_nodes[1:]
            for connection in httpx.get(f"http://127.0.0.1:{node.monitor_port}/connz", params={"limit": 1000},
                                        timeout=5).json()["connections"]
        ]  # fmt: skip
        assert f"posttrade-{service.name}" in names, names
        assert any(name.startswith(f"posttrade-{service.name}-pull-") for name in names), names
    finally:
        local_stack.up(cluster, names=[first.name])
        service.stop()
    assert node_healthy(cluster, first)
