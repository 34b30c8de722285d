"""hot_cache without servers: config, ptrc's positions kept by revision (the batch
reduction, the take_positions agent and its sink, the POSITIONS read-through on the
in-memory transport, in the service's namespace), QuestDB value parsing, request
validation. The Valkey scripts' half of the revision rule runs on a real Valkey:
tests/integration/test_hot_cache.py."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import msgspec
import pytest

from redis.exceptions import ResponseError

from posttrade.agents.hot_cache import PositionsUnusable, PublishedPositions, add_position_agent, highest_revisions
from posttrade.app import App
from posttrade.config import ConfigError, load_config
from posttrade.services import hot_cache
from posttrade.sinks import RetryPolicy, SinkRefused, SinkUnavailable
from posttrade.stores.questdb.read_through import ReadThroughError, iso_to_ns, to_decimal
from posttrade.stores.valkey.hot_cache import CacheKeys, ValkeyPositionsSink
from posttrade.streams import subjects
from posttrade.streams.events import PositionUpdate, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.web.server import build_web_app

D = Decimal
T0 = 1_700_000_000_000_000_000


def test_the_shipped_config_loads_with_the_documented_defaults():
    config = load_config("hot_cache", hot_cache.CONFIG, env={})
    assert config.service.port == 8088
    assert config.cache.redis.ttl == 300
    assert config.hot_cache.bar_intervals == ["1s", "1m", "5m"]
    assert config.hot_cache.read_through.tables.market_trades == "market_trades"


@pytest.mark.parametrize(
    "variable, value",
    [
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__BAR_INTERVALS", "[7m]"),  # a list from env stays text: refused
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__KEY_PREFIX", "a:b"),
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__BARS_KEPT", "0"),
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__DEFAULT_BAR_INTERVAL", "fortnight"),
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__READ_THROUGH__TABLES__QUOTES", "quotes; DROP TABLE x"),
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__UNKNOWN", "1"),
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__DEFAULT_BAR_LIMIT", "500"),  # more than bars_kept
    ],
)
def test_bad_config_values_stop_the_service(variable, value):
    with pytest.raises(ConfigError):
        load_config("hot_cache", hot_cache.CONFIG, env={variable: value})


def test_intervals_that_do_not_divide_a_day_are_refused(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("service: {name: hot_cache, port: 8088}\nhot_cache: {bar_intervals: [1m, 7m]}\n")
    with pytest.raises(ConfigError, match="7m"):
        load_config("hot_cache", hot_cache.CONFIG, path=path, env={})


def test_questdb_timestamps_parse_exactly():
    assert iso_to_ns("2023-11-14T22:13:20.000000Z") == T0
    assert iso_to_ns("2023-11-14T22:13:20.123456Z") == T0 + 123_456_000
    assert iso_to_ns("2023-11-14T22:13:20.123456789Z") == T0 + 123_456_789
    assert iso_to_ns("2023-11-14T22:13:20Z") == T0
    with pytest.raises(ReadThroughError):
        iso_to_ns("2023-11-14 22:13:20")
    assert iso_to_ns("1970-01-01T00:00:00.000000001Z") == 1
    assert iso_to_ns("2024-02-29T23:59:59.999999999Z") == 1_709_251_199_999_999_999
    for bad in ("2023-11-14T22:13:20.12x4Z", "2023-13-14T22:13:20Z", "2023-11-14T24:00:00Z",
                "2023-11-14T22:13:20.1234567890Z", None, 1700000000):
        with pytest.raises(ReadThroughError):
            iso_to_ns(bad)


def test_questdb_numbers_become_plain_decimals():
    assert str(to_decimal("10.500000")) == "10.5"  # DECIMAL(18,6)
    assert str(to_decimal(101.25)) == "101.25"  # DOUBLE
    assert str(to_decimal(0.1)) == "0.1"  # its shortest repr, not 0.1000000000000000055...
    assert str(to_decimal(100)) == "100"
    assert to_decimal(None) is None
    with pytest.raises(ReadThroughError):
        to_decimal("abc")
    with pytest.raises(ReadThroughError):
        to_decimal(True)


# -- ptrc's positions, kept by revision ---------------------------------------------------


def update(revision: int, ts: int, *, account: str = "A1", symbol: str = "ESZ5", net_qty: str = "2",
           reason: str = "fill") -> PositionUpdate:
    """A PositionUpdate of a multiplier-50 future: (net_qty x 4512 - open_cost) x 50."""
    qty = D(net_qty)
    return PositionUpdate(
        ts=ts, account=account, symbol=symbol, reason=reason, multiplier=D("50"), net_qty=qty,
        avg_open_price=D("4500"), open_cost=qty * 4500, realized_pnl_gross=D("0"), fees=D("2.1"),
        realized_pnl_net=D("-2.1"), fifo_open_cost=qty * 4500, fifo_realized_pnl_gross=D("0"),
        sod_realized_pnl_net=D("0"), sod_unrealized_pnl=D("0"), mark=D("4512"), unrealized_pnl=qty * 12 * 50,
        revision=revision,
    )


def test_an_older_ts_with_a_higher_revision_replaces():
    on_time = update(1, T0 + 10, net_qty="2")
    late = update(2, T0 + 5, net_qty="3", reason="late")  # a late fill: older event time
    assert highest_revisions([on_time, late]) == [late]


def test_a_lower_revision_never_replaces_whatever_its_ts_or_order():
    current = update(5, T0 + 5, net_qty="3")
    stale = [update(4, T0 + 99, net_qty="9"), update(1, T0 + 1, net_qty="1")]
    assert highest_revisions([current, *stale]) == [current]
    assert highest_revisions([*stale, current]) == [current]
    # One revision twice (a resend): the first is kept, as Valkey keeps the stored one.
    resent = msgspec.structs.replace(current, ts=T0 + 50)
    assert highest_revisions([current, resent])[0] is current


def test_each_position_keeps_its_own_highest_revision():
    es = [update(1, T0 + 3), update(3, T0 + 1), update(2, T0 + 2)]
    other_account = update(7, T0, account="A2")
    other_symbol = update(1, T0 + 9, symbol="NQZ5")
    kept = highest_revisions([*es, other_account, other_symbol])
    assert kept == [es[1], other_account, other_symbol]


class RecordingPositionCache:
    """What take_positions writes, batch by batch (the Valkey side is integration tested);
    the first `failures` writes find Valkey away."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.batches: list[list[PositionUpdate]] = []
        self.failures = failures
        self.error = error

    async def write_positions(self, updates) -> None:
        if self.error is not None:
            raise self.error
        if self.failures:
            self.failures -= 1
            raise SinkUnavailable("Valkey away for the test")
        self.batches.append(list(updates))


FAST_RETRY = RetryPolicy(attempts=2, initial_s=0.01, max_s=0.02)


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_the_position_agent_writes_the_highest_revision_of_a_batch_not_the_newest_ts():
    transport = MemoryTransport()
    app = App("hc", transport)
    app.runtime.poll_timeout_s = 0.02
    positions = subjects.positions(app)
    cache = RecordingPositionCache()
    add_position_agent(app, positions, ValkeyPositionsSink("valkey-positions", cache), max_events=10, within_s=0.05)
    published = [update(1, T0 + 10, net_qty="2"), update(2, T0 + 5, net_qty="3", reason="late"),
                 update(1, T0 + 20, symbol="NQZ5")]
    # On the stream before the agent starts: its first batch takes all three.
    await transport.ensure_stream(positions.stream)
    for u in published:
        await transport.publish(subjects.position_subject(u.account, u.symbol), encode(u))
    async with app:
        await wait_for(lambda: transport.ack_floors.get(("POSITIONS", "hc-take_positions"), 0) == 3)
    assert cache.batches == [[published[1], published[2]]]  # the late fill's update, not the newer ts


async def test_a_batch_is_acknowledged_only_once_valkey_has_it():
    transport = MemoryTransport()
    app = App("hc", transport)
    app.runtime.poll_timeout_s = 0.02
    positions = subjects.positions(app)
    cache = RecordingPositionCache(failures=3)
    sink = ValkeyPositionsSink("valkey-positions", cache, FAST_RETRY)
    add_position_agent(app, positions, sink, max_events=10, within_s=0.02)
    await transport.ensure_stream(positions.stream)
    acked_while_away = []

    async def watch_floor() -> None:
        while cache.failures:
            acked_while_away.append(transport.ack_floors.get(("POSITIONS", "hc-take_positions"), 0))
            await asyncio.sleep(0.005)

    published = update(1, T0)
    await transport.publish(subjects.position_subject(published.account, published.symbol), encode(published))
    async with app:
        watcher = asyncio.create_task(watch_floor())
        await wait_for(lambda: transport.ack_floors.get(("POSITIONS", "hc-take_positions"), 0) == 1)
        await watcher
    assert cache.batches == [[published]]
    assert acked_while_away and set(acked_while_away) == {0}
    assert (sink.stats.errors, sink.stats.retries, sink.stats.rows) == (3, 3, 1)


async def test_valkey_refusing_the_command_itself_is_not_retried():
    cache = RecordingPositionCache(error=ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    sink = ValkeyPositionsSink("valkey-positions", cache, FAST_RETRY)
    sink.add(update(1, T0))
    with pytest.raises(SinkRefused, match="WRONGTYPE"):
        await sink.flush()
    assert sink.stats.refused == 1 and sink.stats.retries == 0
    assert sink.pending == 1  # kept: the batch is discarded with the agent's crash


async def positions_stream(*updates: PositionUpdate, raw: list[tuple[str, bytes]] = ()) -> tuple[App, PublishedPositions]:
    transport = MemoryTransport()
    app = App("hc", transport)
    channel = subjects.positions(app)
    await transport.ensure_stream(channel.stream)
    for u in updates:
        await transport.publish(subjects.position_subject(u.account, u.symbol), encode(u))
    for subject, data in raw:
        await transport.publish(subject, data)
    return app, PublishedPositions(transport, channel, timeout_s=0.5)


async def test_a_miss_reads_the_accounts_last_update_per_symbol_as_published():
    es = update(2, T0 + 5, account="ACC.1", net_qty="3", reason="late")
    nq = update(4, T0 + 8, account="ACC.1", symbol="NQZ5")
    # Another account, one whose name is a prefix of this one's, and one that differs
    # only by the dot the subject token escapes: none of theirs is read.
    others = [update(9, T0, account="ACC"), update(9, T0, account="ACC.10"), update(9, T0, account="ACC_1")]
    _, published = await positions_stream(*others, es, nq, *others)
    assert published.account_subjects("ACC.1") == "posttrade.positions.ACC%2E1.>"
    assert await published.positions("ACC.1") == [es, nq]
    assert await published.positions("NOBODY") == []


async def test_a_miss_refuses_what_is_not_a_position_of_the_account():
    _, published = await positions_stream(raw=[("posttrade.positions.A1.ESZ5", b'{"ts": 1}')])
    with pytest.raises(PositionsUnusable, match="is not a PositionUpdate"):
        await published.positions("A1")
    misrouted = update(1, T0, account="A2")
    _, published = await positions_stream(raw=[("posttrade.positions.A1.ESZ5", encode(misrouted))])
    with pytest.raises(PositionsUnusable, match="account 'A2', not 'A1'"):
        await published.positions("A1")


async def test_the_service_reads_positions_on_its_namespaced_stream():
    config = load_config("hot_cache", hot_cache.CONFIG, env={"POSTTRADE_HOT_CACHE__SERVICE__NAMESPACE": "t1a2b"})
    transport = MemoryTransport()
    service = hot_cache.build(config, transport=transport)
    positions = service.channels.positions
    assert positions.stream.name == "T1A2B_POSITIONS"
    assert positions.stream.subjects == ("t1a2b.posttrade.positions.>",)
    published = PublishedPositions(transport, positions, timeout_s=0.5)
    assert published.account_subjects("A1") == "t1a2b.posttrade.positions.A1.>"
    await transport.ensure_stream(positions.stream)
    mine, outside = update(3, T0), update(9, T0, net_qty="7")
    await transport.publish(service.app.subject(subjects.position_subject("A1", "ESZ5")), encode(mine))
    await transport.ensure_stream(subjects.positions(App("other", transport)).stream)  # no namespace
    await transport.publish(subjects.position_subject("A1", "ESZ5"), encode(outside))
    assert await service.reads.published.positions("A1") == [mine]


def test_key_scheme():
    keys = CacheKeys("pt")
    assert keys.bars("BRK.B", "1m") == "pt:bars:BRK.B:1m"
    assert keys.quote("XYZ") == "pt:quote:XYZ"
    assert keys.positions("ACC-1") == "pt:pos:ACC-1"
    assert keys.pattern("bars") == "pt:bars:*"


@pytest.fixture
def web():
    config = load_config("hot_cache", hot_cache.CONFIG, env={})
    service = hot_cache.build(config)  # not started: these requests are refused before any I/O
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(service.app)), base_url="http://test")


@pytest.mark.parametrize(
    "path, parameter",
    [
        ("/bars/XYZ?interval=7x", "interval"),
        ("/bars/XYZ?interval=1m&limit=0", "limit"),
        ("/bars/XYZ?limit=abc", "limit"),
        ("/bars/XYZ?limit=201", "limit"),  # more than bars_kept
        ("/bars/%20XY", "symbol"),  # whitespace at an end (inside a name it is fine, as in events)
        ("/quotes/X%09Y", "symbol"),
        ("/positions/" + "A" * 129, "account"),
    ],
)
async def test_bad_requests_are_400_json(web, path, parameter):
    async with web:
        response = await web.get(path)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "bad request" and body["detail"]["parameter"] == parameter
