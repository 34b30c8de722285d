"""hot_cache without servers: config, the ptrc payload, QuestDB value parsing, positions
rebuilt from fills, request validation."""

from __future__ import annotations

from decimal import Decimal

import httpx
import msgspec
import pytest

from posttrade.config import ConfigError, load_config
from posttrade.services import hot_cache
from posttrade.services.hot_cache import (
    CacheKeys,
    CachedPosition,
    ReadThroughError,
    iso_to_ns,
    rebuild_positions,
    to_decimal,
)
from posttrade.streams.events import Fill, InvalidEvent, decode
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
        ("POSTTRADE_HOT_CACHE__HOT_CACHE__READ_THROUGH__TABLES__FILLS", "fills; DROP TABLE x"),
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


def test_position_update_accepts_fields_it_does_not_know():
    raw = (
        b'{"ts": 1700000000000000000, "account": "A1", "symbol": "XYZ", "net_qty": "-5",'
        b' "avg_open_price": "101.5", "realized_pnl_gross": "12", "fees": "1.5", "realized_pnl_net": "10.5",'
        b' "mark": null, "unrealized_pnl": null, "fifo_realized_pnl_gross": "11", "day_pnl": "3"}'
    )
    update = decode(CachedPosition, raw)
    assert update.net_qty == D("-5") and update.mark is None
    # Stored re-encoded, without the extra fields; the set-if-newer scripts find `"ts":`.
    stored = msgspec.json.encode(update)
    assert b'"ts":1700000000000000000' in stored and b"day_pnl" not in stored
    with pytest.raises(InvalidEvent):
        decode(CachedPosition, b'{"ts": 5, "account": "A1", "symbol": "XYZ", "net_qty": "1"}')
    with pytest.raises(InvalidEvent):
        decode(CachedPosition, b'{"ts": 1700000000000000000, "account": "", "symbol": "XYZ", "net_qty": "1"}')


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


def fill(i: int, symbol: str, side: str, qty: str, price: str, fee: str = "0") -> Fill:
    return Fill(ts=T0 + i, fill_id=f"f{i}", account="A1", symbol=symbol, side=side, qty=D(qty), price=D(price),
                fee=D(fee))


def test_positions_rebuilt_from_fills_by_hand():
    fills = [
        fill(1, "XYZ", "BUY", "10", "100", "1"),
        fill(2, "XYZ", "BUY", "10", "110", "1"),  # avg (1000 + 1100) / 20 = 105
        fill(3, "XYZ", "SELL", "5", "120", "0.5"),  # realizes 5 x (120 - 105) = 75
        fill(4, "ABC", "SELL", "3", "50"),  # short 3 at 50, no quote: no mark
    ]
    updates = {u.symbol: u for u in rebuild_positions("A1", fills, {"XYZ": D("118")})}
    xyz = updates["XYZ"]
    assert (xyz.ts, xyz.net_qty, xyz.avg_open_price) == (T0 + 3, D("15"), D("105"))
    assert (xyz.realized_pnl_gross, xyz.fees, xyz.realized_pnl_net) == (D("75"), D("2.5"), D("72.5"))
    assert (xyz.mark, xyz.unrealized_pnl) == (D("118"), D("195"))  # 15 x (118 - 105)
    abc = updates["ABC"]
    assert (abc.net_qty, abc.avg_open_price, abc.mark, abc.unrealized_pnl) == (D("-3"), D("50"), None, None)


def test_key_scheme():
    keys = CacheKeys("pt")
    assert keys.bars("BRK.B", "1m") == "pt:bars:BRK.B:1m"
    assert keys.quote("XYZ") == "pt:quote:XYZ"
    assert keys.positions("ACC-1") == "pt:pos:ACC-1"
    assert keys.pattern("bars") == "pt:bars:*"


@pytest.fixture
def web():
    config = load_config("hot_cache", hot_cache.CONFIG, env={})
    app = hot_cache.build(config)  # not started: these requests are refused before any I/O
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_web_app(app)), base_url="http://test")


@pytest.mark.parametrize(
    "path, parameter",
    [
        ("/bars/XYZ?interval=7x", "interval"),
        ("/bars/XYZ?interval=1m&limit=0", "limit"),
        ("/bars/XYZ?limit=abc", "limit"),
        ("/bars/XYZ?limit=201", "limit"),  # more than bars_kept
        ("/bars/X%20Y", "symbol"),
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
