"""feast_pipeline on the real servers: NATS JetStream and Valkey (Feast's Redis online store).

Streams, buckets, the Feast project and Valkey keys are unique per test and removed
afterwards (the dev stack is shared).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import nats
import pytest
import redis.asyncio as redis_asyncio

from posttrade.agents.features import FeatureChannels
from posttrade.app import App
from posttrade.features.online import FeastRedisWriter, RespConnection
from posttrade.features.views import ACCOUNT_FEATURES, SYMBOL_TRADE_FEATURES
from posttrade.services.feast_pipeline import assemble
from posttrade.streams.events import MarketTrade, Order, PositionUpdate, Quote
from posttrade.streams.nats import NatsTransport

from ..unit.test_features_pipeline import at, run_scenario, scenario_config

VALKEY_DB = 5
# Third-party noise: DuckDB deprecations seen through ibis, and Feast's own online write
# truncating event times to the microsecond (as intended).
pytestmark = [
    pytest.mark.filterwarnings("ignore:fetch_arrow_table:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Discarding nonzero nanoseconds:UserWarning"),
]


class Names:
    def __init__(self) -> None:
        self.suffix = uuid.uuid4().hex[:8]
        self.app = f"feast_it_{self.suffix}"
        self.prefix = f"fit{self.suffix}"  # subject prefix: keeps clear of the real md.* / trading.*
        self.project = f"fit_{self.suffix}"

    def stream(self, kind: str) -> str:
        return f"FIT_{self.suffix.upper()}_{kind}"


@pytest.fixture
def names():
    return Names()


def channels(app: App, names: Names) -> FeatureChannels:
    def channel(kind, value_type, subject):
        return app.channel(kind, stream=names.stream(kind.upper()), subjects=[f"{names.prefix}.{subject}.>"], value_type=value_type)

    return FeatureChannels(
        trades=channel("trades", MarketTrade, "md.trades"),
        quotes=channel("quotes", Quote, "md.quotes"),
        positions=channel("positions", PositionUpdate, "posttrade.positions"),
        orders=channel("orders", Order, "trading.orders"),
    )


async def cleanup(url: str, names: Names, app: App) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        for kind in ("TRADES", "QUOTES", "POSITIONS", "ORDERS"):
            with contextlib.suppress(Exception):
                await js.delete_stream(names.stream(kind))
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


async def test_known_sequence_on_nats_and_valkey(stack, names, tmp_path):
    config = scenario_config(tmp_path / "feast", online_store="valkey", redis=redis_section(stack), project=names.project)
    assert config.feast.online_writer == "direct"
    app = App(names.app, NatsTransport(stack.nats_url))
    app.runtime.poll_timeout_s = 0.1
    assemble(app, config, channels(app, names))
    nc = await nats.connect(stack.nats_url)
    js = nc.jetstream()

    async def publish(subject: str, data: bytes) -> None:
        await js.publish(f"{names.prefix}.{subject}", data)

    try:
        async with app:
            await run_scenario(app, publish)
    finally:
        await nc.close()
        await cleanup(stack.nats_url, names, app)
        await delete_project_keys(stack, names.project)


async def test_direct_writer_stores_what_feast_itself_stores(stack, tmp_path):
    """Row for row, the direct writer's hashes equal those of Feast's own online write."""
    from posttrade.features.repo import FeastSettings
    from posttrade.features.store import FeatureRepository

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
    """Valkey unreachable: the push is retried (errors counted) and completes once it is back.

    The writer talks to a local TCP relay in front of Valkey that is down at first.
    """
    from posttrade.features.publisher import FeaturePublisher
    from posttrade.features.repo import FeastSettings
    from posttrade.features.store import FeatureRepository

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

    connection = RespConnection("127.0.0.1", port, db=VALKEY_DB, timeout_s=2)
    publisher = FeaturePublisher(repository, direct_writer=FeastRedisWriter(connection, project, repository.views.values()))
    kept_alive = []

    async def keep_alive():
        kept_alive.append(time.monotonic())

    row = ("ACC9", at(3), 1.0, 2.0, 3.0, 4)
    push = asyncio.create_task(publisher.push(ACCOUNT_FEATURES.name, [row], keep_alive))
    try:
        await asyncio.sleep(2.0)
        assert not push.done()
        status = publisher.status[ACCOUNT_FEATURES.name]
        assert status.errors >= 2 and "ConnectionRefusedError" in status.last_error
        assert kept_alive
        server = await asyncio.start_server(relay, "127.0.0.1", port)
        try:
            await asyncio.wait_for(push, 30)
        finally:
            server.close()
        assert status.rows_pushed == 1
        [values] = await asyncio.to_thread(repository.online_features, "account", ["ACC9"], ["account_features:fills_today"])
        assert values["account_features:fills_today"] == 4
    finally:
        push.cancel()
        await connection.close()
        await delete_project_keys(stack, project)
