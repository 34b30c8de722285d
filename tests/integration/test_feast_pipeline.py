"""feast_pipeline on the real servers: NATS JetStream and Valkey (Feast's Redis online store).

Each test has its own namespace (streams, subjects, consumers, buckets) and Feast
project (Valkey keys), removed afterwards (the dev stack is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid

import nats
import pytest
import redis.asyncio as redis_asyncio
from prometheus_client import CollectorRegistry

from posttrade.app import App
from posttrade.features.views import ACCOUNT_FEATURES, SYMBOL_TRADE_FEATURES
from posttrade.services.feast_pipeline import build
from posttrade.sinks import RetryPolicy
from posttrade.stores.feast.client import FeastClient, FeastSettings
from posttrade.stores.feast.online import FeastRedisWriter, RespConnection
from posttrade.stores.feast.sink import FeastPushSink
from posttrade.stores.feast.status import FeatureStatus
from posttrade.streams.nats import NatsTransport

from ..unit.test_features_pipeline import at, run_scenario, scenario_config

VALKEY_DB = 5
# Third-party noise: DuckDB deprecations seen through ibis, and Feast's own online write
# truncating event times to the microsecond (as intended).
pytestmark = [
    pytest.mark.filterwarnings("ignore:fetch_arrow_table:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Discarding nonzero nanoseconds:UserWarning"),
]


async def cleanup(url: str, app: App) -> None:
    """Delete the streams (the dead-letter one too) and buckets of `app`'s namespace."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    streams = {channel.stream.name for channel in app.channels.values()}
    streams.add(app.stream_name(app.runtime.dead_letter_stream().name))
    try:
        for stream in streams:
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
        for table in app.tables.values():
            # A windowed table has two buckets: its windows and its watermark.
            buckets = [table.table.bucket, table.meta.bucket] if hasattr(table, "table") else [table.bucket]
            for bucket in buckets:
                with contextlib.suppress(Exception):
                    await js.delete_key_value(bucket)
    finally:
        await nc.close()


async def delete_project_keys(stack, project: str) -> None:
    client = redis_asyncio.Redis(host=stack.valkey_host, port=stack.valkey_port, db=VALKEY_DB)
    try:
        async for key in client.scan_iter(match=b"*" + project.encode(), count=1000):
            await client.delete(key)
    finally:
        await client.aclose()


def redis_section(stack) -> dict:
    return {"host": stack.valkey_host, "port": stack.valkey_port, "db": VALKEY_DB}


async def test_known_sequence_on_nats_and_valkey(stack, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    project = f"fit_{suffix}"
    config = scenario_config(
        tmp_path / "feast", online_store="valkey", redis=redis_section(stack), project=project, namespace=f"fit{suffix}"
    )
    assert config.feast.online_writer == "direct"
    service = build(config, transport=NatsTransport(stack.nats_url))
    service.app.runtime.poll_timeout_s = 0.1
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()

    async def publish(subject: str, data: bytes) -> None:
        await js.publish(service.app.subject(subject), data)

    try:
        async with service.app:
            await run_scenario(service, publish)
    finally:
        await nc.close()
        await cleanup(stack.nats_url, service.app)
        await delete_project_keys(stack, project)


async def test_direct_writer_stores_what_feast_itself_stores(stack, tmp_path):
    """Row for row, the direct writer's hashes equal those of Feast's own online write."""
    from posttrade.stores.feast.store import FeatureRepository

    suffix = uuid.uuid4().hex[:8]
    ours, feasts = f"fdw_{suffix}", f"ffw_{suffix}"
    base = at(0)
    rows = {
        SYMBOL_TRADE_FEATURES.name: [
            ("ACME", base, 0.01, -0.02, 0.03, 101.25, 7, 70.5, None),
            ("ZZZ", base + 1_500, None, None, None, 9.0, 1, 1.0, -1.0),
        ],
        ACCOUNT_FEATURES.name: [("ACC1", base + 2_000_000_123, 4460.0, -1.0, 58.5, 3)],
    }
    repositories = {}
    try:
        for project in (ours, feasts):
            settings = FeastSettings(
                project=project, data_dir=tmp_path / project, online_store="valkey",
                redis_host=stack.valkey_host, redis_port=stack.valkey_port, redis_db=VALKEY_DB,
            )
            repositories[project] = repository = FeatureRepository(settings)
            await asyncio.to_thread(repository.apply)
        connection = RespConnection(stack.valkey_host, stack.valkey_port, db=VALKEY_DB)
        writer = FeastRedisWriter(connection, ours, repositories[ours].views.values())
        for view, view_rows in rows.items():
            assert await writer.write(view, view_rows) == len(view_rows)
            await asyncio.to_thread(
                repositories[feasts].write_online_through_feast, repositories[feasts].views[view], view_rows
            )
        await writer.close()

        client = redis_asyncio.Redis(host=stack.valkey_host, port=stack.valkey_port, db=VALKEY_DB)
        try:
            ours_keys = sorted([k async for k in client.scan_iter(match=b"*" + ours.encode())])
            feasts_keys = sorted([k async for k in client.scan_iter(match=b"*" + feasts.encode())])
            assert len(ours_keys) == 3
            assert [k[: -len(ours)] for k in ours_keys] == [k[: -len(feasts)] for k in feasts_keys]
            for mine, theirs in zip(ours_keys, feasts_keys):
                assert await client.hgetall(mine) == await client.hgetall(theirs)
        finally:
            await client.aclose()

        # And Feast reads the direct writer's rows back.
        [acme, zzz] = await asyncio.to_thread(
            repositories[ours].online_features, "symbol", ["ACME", "ZZZ"],
            ["symbol_trade_features:vwap_5m", "symbol_trade_features:trade_count_1m", "symbol_trade_features:trade_imbalance_1m"],
        )
        assert acme["symbol_trade_features:vwap_5m"] == 101.25 and acme["symbol_trade_features:trade_count_1m"] == 7
        assert acme["symbol_trade_features:trade_imbalance_1m"] is None
        assert zzz["symbol_trade_features:trade_imbalance_1m"] == -1.0
    finally:
        for project in (ours, feasts):
            await delete_project_keys(stack, project)


async def test_push_waits_for_valkey_to_come_back(stack, tmp_path):
    """Valkey unreachable: the push sink retries (the view's errors counted, the batch in
    hand kept alive) and completes once it is back.

    The writer talks to a local TCP relay in front of Valkey that is down at first.
    """
    from posttrade.stores.feast.store import FeatureRepository

    project = f"fre_{uuid.uuid4().hex[:8]}"
    settings = FeastSettings(
        project=project, data_dir=tmp_path / project, online_store="valkey",
        redis_host=stack.valkey_host, redis_port=stack.valkey_port, redis_db=VALKEY_DB,
    )
    repository = FeatureRepository(settings)
    await asyncio.to_thread(repository.apply)

    async def relay(reader, writer):
        upstream_reader, upstream_writer = await asyncio.open_connection(stack.valkey_host, stack.valkey_port)

        async def pipe(src, dst):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    probe = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()  # the port is free now: connections are refused

    # The same repository, its online store reached through the relay.
    feast = FeastClient("direct")
    await feast.open(FeatureRepository(dataclasses.replace(settings, redis_host="127.0.0.1", redis_port=port)))
    status = FeatureStatus(CollectorRegistry())
    sink = FeastPushSink(ACCOUNT_FEATURES, feast, status, RetryPolicy(), writer="test")
    kept_alive = []

    class BatchInHand:
        """What the sink tells, while it retries, that the batch is still being worked on."""

        async def keep_alive(self):
            kept_alive.append(time.monotonic())

    sink.add(("ACC9", at(3), 1.0, 2.0, 3.0, 4))
    push = asyncio.create_task(sink.flush(BatchInHand()))
    try:
        await asyncio.sleep(2.0)
        assert not push.done()
        view = status[ACCOUNT_FEATURES.name]
        assert view.errors >= 2 and "ConnectionRefusedError" in view.last_error
        assert kept_alive
        server = await asyncio.start_server(relay, "127.0.0.1", port)
        try:
            await asyncio.wait_for(push, 30)
        finally:
            server.close()
        assert view.rows_pushed == 1 and view.entities_written_online == 1
        [values] = await asyncio.to_thread(repository.online_features, "account", ["ACC9"], ["account_features:fills_today"])
        assert values["account_features:fills_today"] == 4
    finally:
        push.cancel()
        await feast.close()
        await delete_project_keys(stack, project)
