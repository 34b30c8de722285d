"""Reports with money in several currencies (issue 14).

A position's report line is in its instrument's currency and, beside it, in its
account's base currency; account totals are in the base only; a rate that is not known
makes the figures that need it null and names the currency in `missing_rates`. The
current day is valued at the current FX marks; a past day at the rates ptrc put in the
roll into the next day, which its snapshot stores (`stores/questdb/rows.py`, `snapshot_record`) and
the report reads back (`core.reports.snapshot_rows`): never at today's.

Worked example (hand-computed below): ACC, based in USD, holds TOYOTA (in JPY) and XYZ
(in USD); USDJPY gives the JPY rate (one JPY is 1 / USDJPY dollars).
"""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import date, datetime, timezone
from decimal import Decimal as D

import msgspec
import pyarrow.parquet as pq

from posttrade.agents.positions import PositionKeeper, position_update
from posttrade.stores.questdb.layouts import LAYOUTS
from posttrade.stores.questdb.rows import SnapshotRecord, snapshot_record

SNAPSHOTS = LAYOUTS["position_snapshots"]
from posttrade.agents.reports import ReportsSection, install_reports
from posttrade.app import App
from posttrade.core.fx import FxRates, invert
from posttrade.core.history import ExecutionBook
from posttrade.core.positions import Position, PositionBook, PositionState
from posttrade.core.reference import FxPair, Instrument, Reference
from posttrade.core.reports import (
    COLUMNS,
    StoredRates,
    TradingDay,
    csv_bytes,
    daily_pnl_rows,
    encode_report,
    iso_ns,
    positions_rows,
    snapshot_row,
    valuations_from_live,
    valuations_from_snapshots,
)
from posttrade.stores.objects import LocalObjectStore
from posttrade.stores.questdb import QuestDBClient
from posttrade.streams import subjects
from posttrade.streams.events import Fill, PositionUpdate, Quote, encode
from posttrade.streams.memory import MemoryTransport
from posttrade.streams.stream import EventRecord

T0 = 1_795_000_000_000_000_000
HOUR = 3_600_000_000_000
DAY = 24 * HOUR
START = T0 - T0 % DAY  # a UTC midnight: the past day is [START, START + DAY)
END = START + DAY
DAY_DATE = date(2026, 11, 20)

REF = Reference(
    {
        "TOYOTA": Instrument(currency="JPY"),
        "USDJPY": Instrument(fx=FxPair("USD", "JPY")),
        "EURUSD": Instrument(fx=FxPair("EUR", "USD")),
        "NESN": Instrument(currency="CHF"),  # nothing quotes CHF: its rate is never known
        "BTCUSDT": Instrument(currency="USDT"),
    },
    base_currencies={"ACC-EU": "EUR"},
    fixed={"USDT": {"USD": D("0.9998")}},
)


def rates(marks: dict[str, str]) -> FxRates:
    return FxRates(REF, lambda s: (D(marks[s]), "quote_mid", T0) if s in marks else None)


def fill(n: int, account: str, symbol: str, side: str, qty: str, price: str, fee: str = "0",
         fee_currency: str | None = None, ts: int | None = None) -> Fill:  # fmt: skip
    return Fill(ts=T0 + n if ts is None else ts, fill_id=f"f{n}", account=account, symbol=symbol, side=side,
                qty=D(qty), price=D(price), fee=D(fee), fee_currency=fee_currency)


def live_book() -> PositionBook:
    executions = ExecutionBook(reference=REF)
    for seq, f in enumerate([
        fill(1, "ACC", "TOYOTA", "BUY", "100", "2000", "150"),  # JPY
        fill(2, "ACC", "TOYOTA", "SELL", "40", "2100", "60"),  # realizes 40 x 100 = 4000 JPY
        fill(3, "ACC", "XYZ", "BUY", "10", "100"),  # USD
        fill(4, "ACC2", "NESN", "BUY", "5", "100"),  # CHF: no rate
        fill(5, "ACC2", "XYZ", "BUY", "1", "100"),
    ], 1):
        assert executions.receive(f, seq).status == "applied"
    return executions.positions


R150 = invert(D(150))  # 0.0066666666666666666667: one JPY in USD at USDJPY 150


# -- the current day: the current rates --------------------------------------------------------


def test_a_jpy_position_today_is_converted_at_the_current_rate_and_the_account_total_is_in_base():
    book = live_book()
    marks = {"TOYOTA": D(2050), "XYZ": D(95), "NESN": D(101)}
    valuations = valuations_from_live(list(book), marks.get, T0, rates({"USDJPY": "150"}))
    rows = daily_pnl_rows(DAY_DATE, valuations)
    by = {(r["level"], r["account"], r["symbol"]): r for r in rows}
    toyota = by[("position", "ACC", "TOYOTA")]
    # In JPY: realized 4000, fees 210, net 3790, unrealized 60 x 2050 - 120000 = 3000, total 6790.
    assert (toyota["currency"], toyota["realized_pnl_net"], toyota["unrealized_pnl"], toyota["total_pnl"]) == (
        "JPY", D(3790), D(3000), D(6790))
    # In USD: each local figure x 1/150, rounded half-even at 12 places.
    assert (toyota["base_currency"], toyota["fx_rate"]) == ("USD", R150)
    assert toyota["realized_pnl_gross_base"] == D("26.666666666667")  # 4000 / 150
    assert toyota["fees_base"] == D("1.400000000000")
    assert toyota["realized_pnl_net_base"] == D("25.266666666667")
    assert toyota["unrealized_pnl_base"] == D("20.000000000000")
    assert toyota["total_pnl_base"] == toyota["day_pnl_base"] == D("45.266666666667")  # 6790 / 150
    assert toyota["missing_rates"] is None
    xyz = by[("position", "ACC", "XYZ")]
    assert (xyz["currency"], xyz["fx_rate"], xyz["total_pnl"], xyz["total_pnl_base"]) == ("USD", 1, D(-50), D(-50))
    # The account: base figures summed, in USD only (never 3790 JPY + 0 USD).
    acc = by[("account", "ACC", None)]
    assert (acc["currency"], acc["base_currency"], acc["fx_rate"], acc["missing_rates"]) == ("USD", "USD", 1, None)
    assert acc["realized_pnl_net"] == acc["realized_pnl_net_base"] == D("25.266666666667")
    assert acc["unrealized_pnl"] == D("-30.000000000000")  # 20 - 50
    assert acc["total_pnl"] == acc["day_pnl"] == acc["total_pnl_base"] == D("-4.733333333333")
    positions = {r["symbol"]: r for r in positions_rows(DAY_DATE, valuations) if r["account"] == "ACC"}
    assert positions["TOYOTA"]["market_value"] == D(123000)  # 60 x 2050 JPY
    assert positions["TOYOTA"]["market_value_base"] == D("820.000000000000")


def test_a_missing_rate_makes_the_figures_that_need_it_null_and_is_named():
    book = live_book()
    marks = {"TOYOTA": D(2050), "XYZ": D(95), "NESN": D(101)}
    rows = daily_pnl_rows(DAY_DATE, valuations_from_live(list(book), marks.get, T0, rates({})))  # no USDJPY
    by = {(r["level"], r["account"], r["symbol"]): r for r in rows}
    toyota = by[("position", "ACC", "TOYOTA")]
    assert toyota["total_pnl"] == D(6790)  # the local figures do not need a rate
    assert toyota["fx_rate"] is None and toyota["total_pnl_base"] is None and toyota["fees_base"] is None
    assert toyota["missing_rates"] == "JPY"
    nesn = by[("position", "ACC2", "NESN")]
    assert (nesn["currency"], nesn["unrealized_pnl"], nesn["unrealized_pnl_base"], nesn["missing_rates"]) == (
        "CHF", D(5), None, "CHF")
    for account, currency in (("ACC", "JPY"), ("ACC2", "CHF")):
        total = by[("account", account, None)]
        assert total["missing_rates"] == currency and total["currency"] == "USD"
        assert all(total[name] is None for name in ("realized_pnl_gross", "fees", "total_pnl", "day_pnl_base"))
    # The CSV shows the currencies and leaves the unknown figures empty.
    text = csv_bytes(COLUMNS["daily_pnl"], rows).decode()
    record = next(r for r in csv.DictReader(io.StringIO(text)) if r["symbol"] == "NESN")
    assert (record["unrealized_pnl"], record["unrealized_pnl_base"], record["missing_rates"]) == ("5", "", "CHF")


def test_an_account_based_in_eur_totals_in_eur():
    executions = ExecutionBook(reference=REF)
    executions.receive(fill(1, "ACC-EU", "XYZ", "BUY", "10", "100"), 1)
    executions.receive(fill(2, "ACC-EU", "TOYOTA", "BUY", "10", "2000"), 2)
    marks = {"XYZ": D(108), "TOYOTA": D(2000)}
    fx = rates({"EURUSD": "1.08", "USDJPY": "150"})
    rows = daily_pnl_rows(DAY_DATE, valuations_from_live(list(executions.positions), marks.get, T0, fx))
    toyota, xyz, total = rows  # by symbol, then the total
    assert (xyz["currency"], xyz["base_currency"], xyz["unrealized_pnl"]) == ("USD", "EUR", D(80))
    assert xyz["unrealized_pnl_base"] == D("74.074074074074")  # 80 / 1.08
    # JPY -> EUR crosses through USD: 1/150 x 1/1.08, the exact product; TOYOTA's unrealized is 0.
    assert toyota["fx_rate"] == D("0.006172839506172839506230864197530864197531")
    assert toyota["unrealized_pnl_base"] == 0
    assert (total["currency"], total["unrealized_pnl"]) == ("EUR", D("74.074074074074"))
    # The Parquet file keeps the cross rate's 42 places (a wider decimal type than the usual).
    _, parquet = encode_report(COLUMNS["daily_pnl"], rows)
    table = pq.read_table(io.BytesIO(parquet))
    assert table.column("fx_rate").to_pylist()[0] == toyota["fx_rate"]
    assert table.column("currency").to_pylist() == ["JPY", "USD", "EUR"]


async def test_the_services_reports_of_today_use_its_current_rates(tmp_path):
    app = App("ptrc", MemoryTransport())
    positions = app.table("positions", value_type=PositionState, key_type=tuple[str, str])
    marks = {"TOYOTA": D(2050), "XYZ": D(95), "NESN": D(101)}
    reports = install_reports(
        app, positions=positions, mark_of=marks.get, fx=rates({"USDJPY": "150"}),
        object_store=LocalObjectStore(tmp_path / "objects"), questdb=QuestDBClient(host="127.0.0.1", port=9, timeout=1),
        clickhouse=None, settings=ReportsSection(spool=False, daily_delay_s=None),
    )
    assert reports.multipliers == {}  # the reference data's
    async with app:
        for position in live_book():
            positions[(position.account, position.symbol)] = position.to_state()
        day = TradingDay().of(datetime.now(timezone.utc))
        await reports.generate(day, ["daily_pnl", "positions"])
    folder = tmp_path / "objects" / "reports" / day.isoformat()
    rows = {(r["level"], r["account"], r["symbol"]): r for r in csv.DictReader(io.StringIO((folder / "daily_pnl.csv").read_text()))}
    toyota = rows[("position", "ACC", "TOYOTA")]
    assert (toyota["currency"], toyota["total_pnl"], toyota["fx_rate"], toyota["total_pnl_base"]) == (
        "JPY", "6790", "0.0066666666666666666667", "45.266666666667")
    acc = rows[("account", "ACC", "")]
    assert (acc["currency"], acc["total_pnl"], acc["missing_rates"]) == ("USD", "-4.733333333333", "")
    assert rows[("account", "ACC2", "")]["missing_rates"] == "CHF"
    held = pq.read_table(folder / "positions.parquet")
    assert held.column("market_value_base").to_pylist()[:2] == [D(820), D(950)]  # TOYOTA, XYZ of ACC


# -- a past day: the rates of the roll, stored with it ----------------------------------------


def roll_update(position: Position, mark: str | None, ts: int, fx: FxRates) -> PositionUpdate:
    """What ptrc's keeper publishes at a roll (`PositionKeeper.roll_day`): the roll,
    with the rates of that moment."""
    position.roll_day(None if mark is None else D(mark))
    update = position_update(position, None if mark is None else D(mark), "roll", ts)
    base = REF.base_currency(position.account)
    rates_now = {c: r.rate for c in (position.currency, *position.foreign_fees) if (r := fx.rate(c, base)) is not None}
    return msgspec.structs.replace(update, base_currency=base, fx_rates=rates_now)


def as_questdb(record: SnapshotRecord) -> dict:
    """A snapshot row as QuestDB's JSON gives it back: decimals as text with their 12
    stored places (rounded half-even), the timestamp as ISO text, VARCHARs as written."""
    out = {}
    for name in SnapshotRecord.__struct_fields__:
        value = getattr(record, name)
        if name == "ts":
            value = iso_ns(value)
        elif isinstance(value, D):
            value = str(value.quantize(D("1E-12")))
        out[name] = value
    return out


def stored(*updates: PositionUpdate):
    return [snapshot_row(as_questdb(snapshot_record(u, REF))) for u in updates]


def test_a_past_day_is_converted_at_the_rates_of_the_roll_into_the_next_day():
    """TOYOTA: 100 @ 2000 held into day D (USDJPY 150 at that roll), 40 sold @ 2100 on D
    (fee 60 JPY), rolled into D+1 at a mark of 2050 with USDJPY at 160. D's P&L is
    3940 realized net + 3000 unrealized = 6940 JPY, x 1/160 = 43.375 USD. At the
    (opening) rate of 150 it would be 46.27, at today's 170 40.82: neither is used."""
    toyota = Position("ACC", "TOYOTA", currency="JPY")
    toyota.apply(fill(1, "ACC", "TOYOTA", "BUY", "100", "2000", ts=START - HOUR))
    xyz = Position("ACC", "XYZ", currency="USD")
    xyz.apply(fill(2, "ACC", "XYZ", "BUY", "10", "100", ts=START - HOUR))
    nesn = Position("ACC", "NESN", currency="CHF")
    nesn.apply(fill(3, "ACC", "NESN", "BUY", "5", "100", ts=START - HOUR))
    at_open = rates({"USDJPY": "150"})
    opening = [roll_update(p, m, START + 5, at_open) for p, m in ((toyota, "2000"), (xyz, "100"), (nesn, "100"))]
    toyota.apply(fill(4, "ACC", "TOYOTA", "SELL", "40", "2100", "60", ts=START + 10 * HOUR))
    at_close = rates({"USDJPY": "160"})
    closing = [roll_update(p, m, END + 5, at_close) for p, m in ((toyota, "2050"), (xyz, "95"), (nesn, "101"))]
    assert closing[0].fx_rates == {"JPY": D("0.00625")} and closing[2].fx_rates == {}  # CHF: unknown

    valuations = valuations_from_snapshots(stored(*opening, *closing), [], (START, END), END + DAY, {}, REF)
    rows = {(r["level"], r["symbol"]): r for r in daily_pnl_rows(DAY_DATE, valuations)}
    t = rows[("position", "TOYOTA")]
    assert (t["currency"], t["total_pnl"], t["day_pnl"], t["valued_at"]) == ("JPY", D(6940), D(6940), END + 5)
    assert (t["base_currency"], t["fx_rate"]) == ("USD", D("0.00625"))
    assert t["day_pnl_base"] == t["total_pnl_base"] == D("43.375")
    assert (t["realized_pnl_net_base"], t["unrealized_pnl_base"], t["fees_base"]) == (
        D("24.625"), D("18.75"), D("0.375"))  # 3940, 3000 and 60 JPY / 160
    x = rows[("position", "XYZ")]
    assert (x["fx_rate"], x["day_pnl"], x["day_pnl_base"]) == (1, D(-50), D(-50))
    n = rows[("position", "NESN")]
    assert (n["day_pnl"], n["day_pnl_base"], n["fx_rate"], n["missing_rates"]) == (D(5), None, None, "CHF")
    total = rows[("account", None)]
    assert (total["currency"], total["missing_rates"], total["day_pnl"], total["total_pnl"]) == ("USD", "CHF", None, None)
    # Without the CHF position the account's day is 43.375 - 50 USD.
    valuations = [v for v in valuations if v.symbol != "NESN"]
    total = next(r for r in daily_pnl_rows(DAY_DATE, valuations) if r["level"] == "account")
    assert (total["day_pnl"], total["day_pnl_base"], total["missing_rates"]) == (D("-6.625"), D("-6.625"), None)
    positions = {r["symbol"]: r for r in positions_rows(DAY_DATE, valuations)}
    assert positions["TOYOTA"]["market_value_base"] == D("768.75")  # 60 x 2050 / 160


def test_a_past_days_fees_in_another_currency_count_at_their_own_rate_of_the_roll():
    """BTCUSDT is in USDT (fixed at 0.9998 USD); its fees are charged in USD. Held into D
    with 1 USD of fees, 2 USD more on D: D's P&L in USD is the USDT day P&L x 0.9998
    less the 2 USD charged that day."""
    btc = Position("ACC", "BTCUSDT", currency="USDT")
    btc.apply(fill(1, "ACC", "BTCUSDT", "BUY", "2", "50000", "1", fee_currency="USD", ts=START - HOUR))
    fx = rates({})
    opening = roll_update(btc, "50000", START + 5, fx)
    btc.apply(fill(2, "ACC", "BTCUSDT", "SELL", "1", "51000", "2", fee_currency="USD", ts=START + HOUR))
    closing = roll_update(btc, "50500", END + 5, fx)
    assert closing.fx_rates == {"USDT": D("0.9998"), "USD": 1} and closing.foreign_fees == {"USD": D(3)}
    (v,) = valuations_from_snapshots(stored(opening, closing), [], (START, END), END + DAY, {}, REF)
    # USDT: realized 1000, unrealized 500: a day of 1500 USDT = 1499.7 USD, less 2 USD of fees.
    assert (v.currency, v.day_pnl, v.fx_rate) == ("USDT", D(1500), D("0.9998"))
    assert v.day_pnl_base == D("1497.7")
    assert v.fees == 0 and v.fees_base == D(3)  # the USD fees are kept apart, never added to USDT


def test_snapshots_stored_before_the_base_columns_convert_only_at_rates_that_hold_at_any_time():
    old = [
        snapshot_row({"ts": iso_ns(END + 5), "account": "ACC", "symbol": symbol, "reason": "roll", "net_qty": "1",
                      "avg_open_price": "10", "realized_pnl_gross": "0", "fees": "0", "realized_pnl_net": "0",
                      "mark": "12", "unrealized_pnl": "2", "day_pnl": "0"})
        for symbol in ("XYZ", "BTCUSDT", "TOYOTA")
    ]
    assert all(row.base_currency is None for row in old)
    btc, toyota, xyz = valuations_from_snapshots(old, [], (START, END), END + DAY, {}, REF)
    assert (xyz.currency, xyz.fx_rate, xyz.total_pnl_base) == ("USD", 1, D(2))  # the same currency
    assert (btc.currency, btc.fx_rate, btc.total_pnl_base) == ("USDT", D("0.9998"), D("1.9996"))  # fixed
    assert (toyota.fx_rate, toyota.total_pnl_base, toyota.missing_rates) == (None, None, ("JPY",))  # a mark's


def test_the_snapshot_row_of_a_roll_carries_the_rolls_rates_and_a_fill_without_rates_says_so():
    toyota = Position("ACC", "TOYOTA", currency="JPY")
    toyota.apply(fill(1, "ACC", "TOYOTA", "BUY", "100", "2000", "150", ts=START))
    roll = roll_update(toyota, "2050", END + 5, rates({"USDJPY": "150"}))
    row = snapshot_record(roll, REF)
    assert (row.currency, row.base_currency, row.fx_rate, row.missing_rates) == (
        "JPY", "USD", "0.0066666666666666666667", None)  # exact text, not DECIMAL(38, 12)
    assert row.unrealized_pnl_base == D("33.333333333333")  # 5000 / 150
    assert row.fees_base == D("1.000000000000") and row.total_pnl_base == D("32.333333333333")
    columns = SNAPSHOTS.build_columns([EventRecord(row, "POSITIONS", 1, "s", T0, 1, None)])
    assert list(columns["fx_rate"]) == ["0.0066666666666666666667"]
    after_fill = position_update(toyota, D(2050), "fill", START)  # carries no rates
    row = snapshot_record(after_fill, REF)
    assert (row.fx_rate, row.total_pnl_base, row.missing_rates) == (None, None, "JPY")
    assert snapshot_record(roll, REF) == snapshot_record(roll, REF)  # the same row however late it is stored


def test_stored_rates_never_read_a_mark():
    rates_at_roll = StoredRates(REF, "USD", {"JPY": D("0.00625")})
    assert rates_at_roll.rate("JPY", "USD").rate == D("0.00625")
    assert rates_at_roll.rate("USD", "USD").rate == 1
    assert rates_at_roll.rate("USDT", "USD").rate == D("0.9998")
    assert rates_at_roll.rate("JPY", "EUR") is None and rates_at_roll.rate("CHF", "USD") is None


# -- ptrc's roll: the rates go with it --------------------------------------------------------


def test_ptrcs_roll_publishes_the_rates_of_its_moment():
    async def main():
        transport = MemoryTransport()
        app = App("ptrc_roll", transport)
        app.runtime.poll_timeout_s = 0.02
        keeper = PositionKeeper(app, reference=REF)
        async with app:
            for f in (fill(1, "ACC", "TOYOTA", "BUY", "100", "2000"), fill(2, "ACC-EU", "XYZ", "BUY", "1", "100"),
                      fill(3, "ACC", "NESN", "BUY", "1", "100")):
                await transport.publish(subjects.fill_subject(f.account, f.symbol), encode(f))
            for symbol, bid, ask in (("USDJPY", "149.9", "150.1"), ("TOYOTA", "2049", "2051")):
                quote = Quote(ts=T0, symbol=symbol, bid=D(bid), ask=D(ask))
                await transport.publish(subjects.quote_subject(symbol), encode(quote))
            deadline = asyncio.get_running_loop().time() + 5
            while len(keeper.positions) < 3 or keeper.mark_reading("USDJPY") is None or keeper.mark_of("TOYOTA") is None:
                assert asyncio.get_running_loop().time() < deadline, "timed out"
                await asyncio.sleep(0.02)
            assert await keeper.roll_day(date(2030, 1, 1)) == 3
            await app.flush_tables()
            messages = transport.streams["POSITIONS"].messages
            rolls = {(u.account, u.symbol): u for u in (msgspec.json.decode(d, type=PositionUpdate) for _, d, _, _ in messages)
                     if u.reason == "roll"}
        toyota = rolls[("ACC", "TOYOTA")]
        assert (toyota.base_currency, toyota.fx_rates, toyota.mark) == ("USD", {"JPY": R150}, D(2050))
        assert rolls[("ACC-EU", "XYZ")].base_currency == "EUR" and rolls[("ACC-EU", "XYZ")].fx_rates == {}  # no EURUSD
        assert rolls[("ACC", "NESN")].fx_rates == {}
        row = snapshot_record(toyota, REF)
        assert row.total_pnl_base == D("33.333333333333")  # 100 x 50 JPY / 150

    asyncio.run(main())
