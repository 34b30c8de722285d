"""Gate test 2, data flow: every hop of the test data verified by a query of its store.

| hop                                   | verified by                                                   |
|---------------------------------------|---------------------------------------------------------------|
| fills → questdb_writer → QuestDB      | SQL: the test fills in the writer's fills table               |
| fills → ptrc → QuestDB                | SQL: the test fills in ptrc's trade blotter (`ptrc_trades`)   |
| ptrc → pnl → QuestDB history          | pnl `/pnl/history` of the test account                        |
| ptrc → report → object storage        | ptrc `GET /reports` lists the files the run generated         |
| market trades → hot_cache → Valkey    | hot_cache `GET /bars/{symbol}` is a hit, with the exact bar   |
| market trades, fills → Feast online   | feast_pipeline `/features/online` for the test symbol/account |
| orders + fills → ClickHouse           | execution_quality `/metrics/execution` has them, slippage too |
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

from ..core.bars import BarState, window_start
from ..core.reports import FORMATS, REPORT_KINDS
from ..stores.questdb import check_identifier, sql_literal
from ..streams.events import Fill, MarketTrade, Order, Quote
from ..streams.subjects import fill_subject, order_subject, quote_subject, trade_subject
from .context import GateContext, ServiceError, settle
from .expected import canonical
from .report import Check, failed

SECTION = 2
MINUTE_NS = 60 * 1_000_000_000
FEATURE_GRACE_S = 5.0  # feast_pipeline's window grace (features.window_grace_s, default 5)

# The market data the run publishes for its market-data symbol: (price, size).
MD_TRADES = (
    ("100.5", "10"), ("100.75", "5"), ("100.25", "20"), ("101", "7"),
    ("100.9", "3"), ("100.6", "12"), ("100.4", "8"), ("100.8", "4"),
)  # fmt: skip

# Execution quality: a quote (mid 100), a BUY order of 20, a fill of 10 at 100.05, a
# later quote that decides the mids: slippage vs arrival mid (100.05 - 100) / 100 = 5 bps.
EXEC_EXPECTED_FILL = {"arrival_mid": "100", "mid_at_fill": "100", "slippage_bps": "5", "qty": "10", "price": "100.05"}
EXEC_EXPECTED_ORDER = {"qty": "20", "filled_qty": "10", "unfilled_qty": "10", "fill_ratio": "0.5", "arrival_mid": "100"}


async def publish_market_data(ctx: GateContext) -> None:
    """Publish what the later data-flow checks look for, early, so the services have
    the whole run to process it: market trades for a test symbol, and an order with a
    fill (and the quotes around them) for execution_quality."""
    now = time.time_ns()
    symbol = ctx.symbol("MD")
    trades = [
        MarketTrade(ts=now + i * 1_000_000, symbol=symbol, price=Decimal(price), size=Decimal(size),
                    trade_id=f"VALIDATE-{ctx.run_id}-T{i}", venue="VALIDATE")
        for i, (price, size) in enumerate(MD_TRADES)
    ]  # fmt: skip
    for trade in trades:
        await ctx.publish(trade_subject(symbol), trade, msg_id=f"validate:{trade.trade_id}")
    ctx.state["md_symbol"] = symbol
    ctx.state["md_trades"] = trades

    account, exec_symbol = ctx.sub_account("EX"), ctx.symbol("EX")
    order_id, fill_id = f"VALIDATE-{ctx.run_id}-EXO", f"VALIDATE-{ctx.run_id}-EXF"
    events = [
        (quote_subject(exec_symbol), Quote(ts=now, symbol=exec_symbol, bid=Decimal("99.99"), ask=Decimal("100.01"),
                                           bid_size=Decimal(100), ask_size=Decimal(100))),
        (order_subject(account, exec_symbol), Order(ts=now + 1_000_000, order_id=order_id, account=account,
                                                     symbol=exec_symbol, side="BUY", qty=Decimal(20), venue="VALIDATE")),
        (fill_subject(account, exec_symbol), Fill(ts=now + 2_000_000, fill_id=fill_id, account=account,
                                                   symbol=exec_symbol, side="BUY", qty=Decimal(10),
                                                   price=Decimal("100.05"), fee=Decimal("0.1"), order_id=order_id,
                                                   venue="VALIDATE", liquidity="TAKER")),
        (quote_subject(exec_symbol), Quote(ts=now + 3_000_000, symbol=exec_symbol, bid=Decimal("100.01"),
                                           ask=Decimal("100.03"), bid_size=Decimal(100), ask_size=Decimal(100))),
    ]  # fmt: skip
    for n, (subject, event) in enumerate(events):
        await ctx.publish(subject, event, msg_id=f"validate:{ctx.run_id}:exec:{n}")
    ctx.state["exec"] = {"account": account, "symbol": exec_symbol, "order_id": order_id, "fill_id": fill_id}


def expected_bars(trades: list[MarketTrade], interval: str) -> dict[int, Any]:
    """The bars the trades make (core.bars, the accumulator hot_cache folds), by open time."""
    states: dict[int, BarState] = {}
    for trade in trades:
        start = window_start(trade.ts, interval)
        states[start] = states.get(start, BarState()).add(trade.ts, trade.price, trade.size)
    return {start: state.to_bar(trades[0].symbol, interval, start) for start, state in states.items()}


async def run(ctx: GateContext) -> list[Check]:
    return [
        await _fills_in_questdb(ctx),
        await _pnl_history(ctx),
        await _report_in_object_storage(ctx),
        await _bars_in_valkey(ctx),
        await _execution_in_clickhouse(ctx),
    ]


async def _writer_table(ctx: GateContext, route: str, default: str) -> str:
    """The QuestDB table the running writer writes `route` to (its /stats says)."""
    stats = await ctx.get_json("questdb_writer", "/stats")
    for table, info in stats.get("tables", {}).items():
        if info.get("route") == route:
            return table
    return default


async def _fills_in_questdb(ctx: GateContext) -> Check:
    name = "dataflow.fills_in_questdb"
    criterion = "fills -> QuestDB: every test fill is a row of questdb_writer's fills table and of ptrc_trades"
    fills: list[Fill] = ctx.state.get("accuracy_fills", [])
    wanted = {f.fill_id for f in fills}
    try:
        writer_table = check_identifier(await _writer_table(ctx, "fills", "fills"))
    except (ServiceError, ValueError) as exc:
        return failed(SECTION, name, criterion, str(exc))
    trades_table = ctx.state.get("ptrc_trades_table", "ptrc_trades")
    account = sql_literal(ctx.account)

    async def fetch() -> dict[str, set[str]]:
        found = {}
        for table in (writer_table, trades_table):
            try:
                rows = await ctx.sql(f"SELECT fill_id FROM {table} WHERE account = {account}")
                found[table] = {r["fill_id"] for r in rows}
            except Exception as exc:  # noqa: BLE001 - the table may not exist yet
                found[table] = set()
                found[f"{table} error"] = {str(exc)[:200]}
        return found

    found, settled = await settle(fetch, lambda f: all(f.get(t) == wanted for t in (writer_table, trades_table)), 30, 0.5)
    details = {
        table: {"rows": len(found.get(table, ())), "missing": sorted(wanted - found.get(table, set())),
                "unexpected": sorted(found.get(table, set()) - wanted)}
        for table in (writer_table, trades_table)
    }  # fmt: skip
    measured = ", ".join(f"{table} {len(found.get(table, ()) & wanted)}/{len(wanted)}" for table in (writer_table, trades_table))
    return Check(SECTION, name, criterion, settled, measured, details=details)


async def _pnl_history(ctx: GateContext) -> Check:
    name = "dataflow.pnl_history"
    criterion = "ptrc -> pnl -> QuestDB: /pnl/history has the test account's snapshots, with its final values"
    expected = ctx.state.get("accuracy_expected")
    if expected is None:
        return failed(SECTION, name, criterion, "no test positions were published")
    symbol = ctx.state["accuracy_scenarios"][0].symbol
    position = expected.position_values(symbol)
    totals = expected.account_values()
    params = {"account": ctx.account, "from": str(ctx.started_ns - MINUTE_NS), "interval": "1s"}

    async def fetch() -> tuple[dict | None, dict | None]:
        by_position = await ctx.get_json("pnl", "/pnl/history", {**params, "symbol": symbol})
        by_account = await ctx.get_json("pnl", "/pnl/history", params)
        return _last_point(by_position), _last_point(by_account)

    def done(points) -> bool:
        pos, acct = points
        return (pos is not None and acct is not None
                and canonical(pos.get("total_pnl")) == canonical(position["total_pnl"])
                and canonical(pos.get("net_qty")) == canonical(position["net_qty"])
                and canonical(acct.get("total_pnl")) == canonical(totals["total_pnl"]))  # fmt: skip

    try:
        (pos, acct), settled = await settle(fetch, done, 30, 0.5)
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    measured = (f"{symbol}: last point total {pos and pos.get('total_pnl')} (expected {canonical(position['total_pnl'])}); "
                f"account: last point total {acct and acct.get('total_pnl')} (expected {canonical(totals['total_pnl'])})")  # fmt: skip
    return Check(SECTION, name, criterion, settled, measured, details={"position_point": pos, "account_point": acct})


def _last_point(history: dict) -> dict | None:
    points = [p for series in history.get("series", []) for p in series.get("points", [])]
    return max(points, key=lambda p: p.get("ts") or "", default=None)


async def _report_in_object_storage(ctx: GateContext) -> Check:
    name = "dataflow.report_in_object_storage"
    criterion = "ptrc -> reports -> object storage: GET /reports lists the run's 8 files (4 reports x CSV, Parquet)"
    generation = ctx.state.get("report_generation")
    if generation is None:
        return failed(SECTION, name, criterion, "no report was generated (see accuracy.report)")
    day = generation["body"]["date"]
    try:
        listing = await ctx.get_json("ptrc", "/reports", {"date": day})
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    wanted = {f"{day}/{kind}.{fmt}" for kind in REPORT_KINDS for fmt in FORMATS}
    listed = {r["name"]: r for r in listing.get("reports", [])}
    missing = sorted(wanted - set(listed))
    sizes = {n: listed[n].get("size") for n in sorted(wanted & set(listed))}
    empty = [n for n, size in sizes.items() if not size]
    measured = f"{len(wanted) - len(missing)}/{len(wanted)} listed for {day}" + (f", {len(empty)} empty" if empty else "")
    return Check(SECTION, name, criterion, not missing and not empty, measured,
                 details={"missing": missing, "empty": empty, "sizes": sizes})  # fmt: skip


async def _bars_in_valkey(ctx: GateContext) -> Check:
    name = "dataflow.bars_in_valkey"
    criterion = "market trades -> hot_cache -> Valkey: GET /bars/{symbol} is a cache hit with the exact 1m bar"
    symbol, trades = ctx.state["md_symbol"], ctx.state["md_trades"]
    bars = expected_bars(trades, "1m")
    newest = bars[max(bars)]
    want = {"ts": newest.ts, "open": newest.open, "high": newest.high, "low": newest.low, "close": newest.close,
            "volume": newest.volume, "count": newest.count, "vwap": newest.vwap}  # fmt: skip

    async def fetch() -> dict:
        response = await ctx.get("hot_cache", f"/bars/{symbol}", {"interval": "1m", "limit": 1})
        return response.json() if response.status_code == 200 else {"status": response.status_code, "body": response.text[:300]}

    def equal(body: dict) -> bool:
        got = (body.get("bars") or [{}])[-1]
        return body.get("hit") is True and all(canonical(got.get(k)) == canonical(v) for k, v in want.items())

    try:
        body, settled = await settle(fetch, equal, 20, 0.25)
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    got = (body.get("bars") or [None])[-1]
    measured = (f"hit={body.get('hit')} source={body.get('source')}, bar "
                + ("equal to the expected OHLCV/VWAP/count" if settled else "differs"))  # fmt: skip
    return Check(SECTION, name, criterion, settled, measured,
                 details={"expected": {k: canonical(v) for k, v in want.items()}, "answer": got or body})  # fmt: skip


async def _execution_in_clickhouse(ctx: GateContext) -> Check:
    name = "dataflow.execution_in_clickhouse"
    criterion = "orders + fills -> execution_quality -> ClickHouse: /metrics/execution returns the test fill and order"
    info = ctx.state["exec"]

    async def fetch() -> tuple[dict | None, dict | None]:
        fills = await ctx.get_json("execution_quality", "/metrics/execution", {"account": info["account"], "level": "fill"})
        orders = await ctx.get_json("execution_quality", "/metrics/execution", {"account": info["account"], "level": "order"})
        fill = next((r for r in fills.get("rows", []) if r.get("fill_id") == info["fill_id"]), None)
        order = next((r for r in orders.get("rows", []) if r.get("order_id") == info["order_id"]), None)
        return fill, order

    def done(rows) -> bool:
        fill, order = rows
        return (fill is not None and order is not None
                and all(canonical(fill.get(k)) == v for k, v in EXEC_EXPECTED_FILL.items())
                and all(canonical(order.get(k)) == v for k, v in EXEC_EXPECTED_ORDER.items()))  # fmt: skip

    try:
        (fill, order), settled = await settle(fetch, done, 30, 0.5)
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    differences = []
    for label, row, want in (("fill", fill, EXEC_EXPECTED_FILL), ("order", order, EXEC_EXPECTED_ORDER)):
        if row is None:
            differences.append(f"{label}: no row")
            continue
        differences += [f"{label} {k}: expected {v}, got {row.get(k)}" for k, v in want.items() if canonical(row.get(k)) != v]
    measured = (f"fill slippage {fill and fill.get('slippage_bps')} bps vs arrival mid {fill and fill.get('arrival_mid')}; "
                f"order fill ratio {order and order.get('fill_ratio')}")  # fmt: skip
    return Check(SECTION, name, criterion, settled, measured, details={"differences": differences})


async def features_online(ctx: GateContext) -> Check:
    """Market trades → feast_pipeline → the online store, checked last: a symbol's
    features appear when its minute closes (event time: a trade more than the grace
    after the minute's end). Without a feed moving time on, the run publishes that
    trade itself once the wall clock allows it."""
    name = "dataflow.features_online"
    criterion = "trades, fills -> feast_pipeline -> Feast online: /features/online has the test symbol's and account's features"
    symbol, trades = ctx.state["md_symbol"], ctx.state["md_trades"]
    minute_start = window_start(trades[-1].ts, "1m")
    in_minute = [t for t in trades if window_start(t.ts, "1m") == minute_start]
    closes_at_ns = minute_start + MINUTE_NS + int(FEATURE_GRACE_S * 1e9) + 500_000_000
    wait_s = max(0.0, (closes_at_ns - time.time_ns()) / 1e9)
    fills = ctx.state.get("accuracy_fills", [])
    try:
        if wait_s:
            await asyncio.sleep(wait_s)
        closing = MarketTrade(ts=max(time.time_ns(), closes_at_ns), symbol=symbol, price=Decimal("100.5"), size=Decimal(1),
                              trade_id=f"VALIDATE-{ctx.run_id}-TCLOSE", venue="VALIDATE")  # fmt: skip
        await ctx.publish(trade_subject(symbol), closing, msg_id=f"validate:{closing.trade_id}")
        want_count, want_volume = len(in_minute), float(sum(t.size for t in in_minute))

        async def fetch() -> tuple[dict, dict]:
            by_symbol = await ctx.get_json("feast_pipeline", "/features/online", {"symbol": symbol})
            by_account = await ctx.get_json("feast_pipeline", "/features/online", {"account": ctx.account})
            return by_symbol.get("features", {}), by_account.get("features", {})

        def done(found) -> bool:
            sym, acct = found
            return (sym.get("symbol_trade_features:trade_count_1m") == want_count
                    and sym.get("symbol_trade_features:volume_1m") == want_volume
                    and acct.get("account_features:fills_today") == len(fills))  # fmt: skip

        (sym, acct), settled = await settle(fetch, done, 30, 0.5)
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    measured = (f"{symbol}: trade_count_1m {sym.get('symbol_trade_features:trade_count_1m')} (expected {want_count}), "
                f"volume_1m {sym.get('symbol_trade_features:volume_1m')}; account fills_today "
                f"{acct.get('account_features:fills_today')} (expected {len(fills)})"
                + (f"; waited {wait_s:.0f} s for the minute to close" if wait_s >= 1 else ""))  # fmt: skip
    return Check(SECTION, name, criterion, settled, measured, details={"symbol_features": sym, "account_features": acct})
