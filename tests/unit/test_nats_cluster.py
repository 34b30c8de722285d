"""What a NATS cluster needs, without a server: every seed URL, where a durable consumer
with deliveries outstanding is recreated (`resume_point`), the local stack's nodes."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import datetime, timezone
from pathlib import Path

import pytest

from nats.js import api

from posttrade.config import ServiceConfig, load_config
from posttrade.stack import HOME_ENV, NATS_CLUSTER_ENV, endpoints, nats_server, stack_servers
from posttrade.streams.nats import NatsTransport, ResumePoint, resume_point, server_urls

CREATED = datetime(2026, 12, 5, 21, 0, tzinfo=timezone.utc)


def info(
    *,
    delivered: tuple[int, int],
    ack_floor: tuple[int, int],
    ack_pending: int,
    policy: api.DeliverPolicy = api.DeliverPolicy.BY_START_SEQUENCE,
    start_seq: int | None = None,
    start_time: datetime | None = None,
) -> api.ConsumerInfo:
    """A ConsumerInfo as the server reports it; sequences are (consumer_seq, stream_seq)."""
    return api.ConsumerInfo(
        name="svc-fills",
        stream_name="FILLS",
        config=api.ConsumerConfig(
            durable_name="svc-fills", deliver_policy=policy, opt_start_seq=start_seq, opt_start_time=start_time,
            ack_policy=api.AckPolicy.ALL,
        ),  # fmt: skip
        delivered=api.SequenceInfo(consumer_seq=delivered[0], stream_seq=delivered[1]),
        ack_floor=api.SequenceInfo(consumer_seq=ack_floor[0], stream_seq=ack_floor[1]),
        num_ack_pending=ack_pending,
        num_redelivered=0,
        num_waiting=0,
        num_pending=0,
        created=CREATED,
    )


def test_nothing_outstanding_keeps_the_consumer():
    assert resume_point(info(delivered=(40, 5040), ack_floor=(40, 5040), ack_pending=0, start_seq=5001)) is None
    # Created and never delivered to: the R3 floor of 0 is no reason to recreate it.
    assert resume_point(info(delivered=(0, 0), ack_floor=(0, 0), ack_pending=0, start_seq=5001)) is None


def test_after_an_acknowledgement_it_resumes_right_after_the_ack_floor():
    point = resume_point(info(delivered=(2000, 7000), ack_floor=(1500, 6500), ack_pending=500, start_seq=5001))
    assert point == ResumePoint(seq=6501)


def test_before_the_first_acknowledgement_an_r3_consumer_resumes_at_its_created_start():
    # What the server reported in the failover that replayed the stream from 1: 2,000
    # delivered, nothing acknowledged yet, ack floor 0 (a single server says start - 1).
    for floor_stream_seq in (0, 5000):
        point = resume_point(
            info(delivered=(2000, 7000), ack_floor=(0, floor_stream_seq), ack_pending=2000, start_seq=5001)
        )
        assert point == ResumePoint(seq=5001)


def test_a_resume_never_goes_below_the_configured_start():
    point = resume_point(info(delivered=(30, 5030), ack_floor=(10, 3), ack_pending=20, start_seq=5001))
    assert point == ResumePoint(seq=5001)


def test_a_consumer_of_new_messages_resumes_at_its_creation_time_before_its_first_ack():
    point = resume_point(info(delivered=(12, 912), ack_floor=(0, 0), ack_pending=12, policy=api.DeliverPolicy.NEW))
    assert point == ResumePoint(time=CREATED)


def test_a_consumer_started_at_a_time_resumes_there_before_its_first_ack():
    start = datetime(2026, 12, 1, tzinfo=timezone.utc)
    point = resume_point(
        info(delivered=(12, 912), ack_floor=(0, 0), ack_pending=12, policy=api.DeliverPolicy.BY_START_TIME,
             start_time=start)
    )  # fmt: skip
    assert point == ResumePoint(time=start)


def test_a_consumer_of_all_history_resumes_at_the_beginning_before_its_first_ack():
    point = resume_point(info(delivered=(12, 12), ack_floor=(0, 0), ack_pending=12, policy=api.DeliverPolicy.ALL))
    assert point == ResumePoint(seq=1)


def test_a_consumer_of_the_last_message_per_subject_is_created_again_as_it_was_before_its_first_ack():
    point = resume_point(
        info(delivered=(3, 912), ack_floor=(0, 0), ack_pending=3, policy=api.DeliverPolicy.LAST_PER_SUBJECT)
    )
    assert point == ResumePoint()


def test_server_urls_take_one_a_comma_separated_string_or_a_list():
    assert server_urls("nats://a:4222") == ["nats://a:4222"]
    three = ["nats://a:4222", "nats://b:4223", "nats://c:4224"]
    assert server_urls("nats://a:4222, nats://b:4223,nats://c:4224") == three
    assert server_urls(["nats://a:4222", "nats://b:4223"]) == ["nats://a:4222", "nats://b:4223"]
    assert NatsTransport("nats://a:1,nats://b:2").servers == ["nats://a:1", "nats://b:2"]
    with pytest.raises(ValueError):
        server_urls(" , ")


def test_nats_url_is_a_list_in_yaml_or_a_comma_separated_environment_variable(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("service: {name: svc, port: 8000}\nnats:\n  url: [nats://a:4222, nats://b:4222]\n  replicas: 3\n")
    config = load_config("svc", ServiceConfig, path=path, env={})
    assert server_urls(config.nats.url) == ["nats://a:4222", "nats://b:4222"] and config.nats.replicas == 3
    env = {"POSTTRADE__NATS__URL": "nats://a:4222,nats://b:4222,nats://c:4222"}
    config = load_config("svc", ServiceConfig, path=path, env=env)
    assert server_urls(config.nats.url) == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]


def test_a_clustered_stack_gives_each_node_its_ports_and_folder_and_the_services_every_url(tmp_path: Path):
    ep = endpoints({HOME_ENV: str(tmp_path), NATS_CLUSTER_ENV: "3"})
    assert [(n.name, n.client_port, n.monitor_port, n.cluster_port) for n in ep.nats_nodes] == [
        ("nats-1", 4222, 8222, 6222), ("nats-2", 4223, 8223, 6223), ("nats-3", 4224, 8224, 6224),
    ]  # fmt: skip
    assert [server.name for server in stack_servers(ep)] == [
        "questdb", "seaweedfs", "nats-1", "nats-2", "nats-3", "valkey"]
    assert len({server.data_dir(ep) for server in stack_servers(ep)}) == 6
    env = ep.service_env()
    assert env["POSTTRADE__NATS__URL"] == "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
    assert env["POSTTRADE__NATS__REPLICAS"] == "3"
    single = endpoints({HOME_ENV: str(tmp_path)})
    assert [n.name for n in single.nats_nodes] == ["nats"] and single.service_env()["POSTTRADE__NATS__REPLICAS"] == "1"


def test_each_cluster_node_routes_to_every_node(tmp_path: Path):
    ep = endpoints({HOME_ENV: str(tmp_path)}, nats_cluster=3)
    folder = tmp_path / "nats-2"
    folder.mkdir()
    nats_server("nats-2").command(ep, folder)
    conf = (folder / "nats.conf").read_text()
    assert 'listen: "127.0.0.1:4223"' in conf and "server_name: posttrade_local_2" in conf
    assert 'listen: "127.0.0.1:6223"' in conf
    assert all(f"nats-route://127.0.0.1:{port}" in conf for port in (6222, 6223, 6224))


def test_a_cluster_must_not_share_a_port_with_another_server(tmp_path: Path):
    with pytest.raises(ValueError, match="share a port"):
        endpoints({HOME_ENV: str(tmp_path)}, nats_cluster=3, valkey_port=4224)
    with pytest.raises(ValueError, match="1, 3 or 5"):
        endpoints({HOME_ENV: str(tmp_path)}, nats_cluster=2)


def test_a_lean_link_opens_on_the_next_seed_server_when_the_first_is_down():
    async def scenario() -> None:
        names = []

        async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Just enough of a NATS server for LeanLink.open: INFO, then PONG to the PING.
            writer.write(b'INFO {"server_id":"fake"}\r\n')
            connect = await reader.readline()
            names.append(json.loads(connect.split(b" ", 1)[1])["name"])
            await reader.readline()
            writer.write(b"PONG\r\n")
            await writer.drain()

        server = await asyncio.start_server(fake_server, "127.0.0.1", 0)
        with socket.socket() as closed:  # a port bound and never listened on: refused
            closed.bind(("127.0.0.1", 0))
            down = f"nats://127.0.0.1:{closed.getsockname()[1]}"
            up = f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            transport = NatsTransport(f"{down},{up}", name="svc")
            link = await transport.open_lean_link(lambda *message: None, purpose="pull-x")
        assert link.is_open and names == ["svc-pull-x"]
        await link.close()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
