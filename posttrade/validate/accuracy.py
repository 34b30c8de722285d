"""Gate test 1, P&L accuracy: test fills whose results are known in advance, checked on
ptrc's `/positions` and `/pnl/summary`, pnl's `/pnl/realtime` and a generated report;
then money in several currencies: positions in made-up currencies valued in their
accounts' base currencies at FX quotes the gate publishes, and again after it moves them.

The expected values are computed by the core the CLI uses (`posttrade positions
compute`, over the same reference data as the services) and the worked example is also
pinned to its literal numbers. Every comparison is exact (decimal equality, field by
field).
"""

from __future__ import annotations

import csv
import io
import os
import time
from decimal import Decimal
from typing import Any

from ..streams.subjects import fill_subject, quote_subject
from .context import GateContext, ServiceError, settle
from .expected import (
    PNL_ACCOUNT_FIELDS,
    PNL_POSITION_FIELDS,
    PTRC_POSITION_FIELDS,
    PTRC_SUMMARY_ACCOUNT_FIELDS,
    PTRC_SUMMARY_SYMBOL_FIELDS,
    REAL_FEED_ASK,
    REAL_FEED_BID,
    REAL_FEED_SYMBOL_SUFFIX,
    REPORT_DAILY_ACCOUNT_FIELDS,
    REPORT_DAILY_POSITION_FIELDS,
    REPORT_POSITIONS_FIELDS,
    CurrencyPlan,
    Difference,
    Expected,
    Scenario,
    accuracy_fills,
    canonical,
    compare,
    mark_quotes,
    pinned_differences,
    real_feed_messages,
    scenarios,
)
from ..core.reference import Reference
from ..streams.events import Quote
from .report import Check, failed

SECTION = 1
ANOTHER_PTRC_HINT = (
    "ptrc shows the expected values but pnl does not. pnl values the positions ptrc publishes on "
    "POSITIONS (msg id pos:<revision>:<account>:<symbol>, so the first publisher of an update wins): is another "
    "ptrc deployment, with other reference data or started later, consuming the same FILLS stream?"
)
FIRST_TIMEOUT_S = 30.0  # the fills travel NATS -> ptrc (-> POSITIONS -> pnl)
NEXT_TIMEOUT_S = 10.0


async def publish_accuracy_trades(ctx: GateContext, multiplier: tuple[str, Decimal] | None,
                                  reference: Reference | None = None) -> Expected:  # fmt: skip
    """Quotes first (so the marks are known), then the fills; returns what they must give."""
    chosen = scenarios(ctx.run_id, *(multiplier or (None, None)))
    now = time.time_ns()
    for quote in mark_quotes(chosen, now):
        await ctx.publish(quote_subject(quote.symbol), quote, msg_id=f"validate:{ctx.run_id}:quote:{quote.symbol}")
    fills = accuracy_fills(ctx.account, ctx.run_id, chosen, now + 1_000_000)
    for fill in fills:
        await ctx.publish(fill_subject(fill.account, fill.symbol), fill, msg_id=f"validate:{fill.fill_id}")
    ctx.state["accuracy_scenarios"] = chosen
    ctx.state["accuracy_fills"] = fills
    expected = Expected.of(ctx.account, fills, chosen, reference)
    ctx.state["accuracy_expected"] = expected
    return expected


async def run(ctx: GateContext, multiplier: tuple[str, Decimal] | None, reference: Reference | None = None,
              currencies: CurrencyPlan | None = None) -> list[Check]:  # fmt: skip
    expected = await publish_accuracy_trades(ctx, multiplier, reference)
    chosen: list[Scenario] = ctx.state["accuracy_scenarios"]
    pinned = _pinned_check(expected, chosen)
    positions = await _surface(ctx, "accuracy.ptrc_positions", "ptrc /positions", _ptrc_positions, expected, FIRST_TIMEOUT_S)
    summary = await _surface(ctx, "accuracy.ptrc_pnl_summary", "ptrc /pnl/summary", _ptrc_summary, expected, NEXT_TIMEOUT_S)
    realtime = await _surface(ctx, "accuracy.pnl_realtime", "pnl /pnl/realtime", _pnl_realtime, expected, FIRST_TIMEOUT_S)
    if positions.passed and not realtime.passed:
        realtime.details["hint"] = ANOTHER_PTRC_HINT
    feed = await _real_feed_check(ctx, reference)
    money = await currency_checks(ctx, currencies) if currencies is not None and currencies.positions else []
    return [pinned, positions, summary, realtime, feed, *money, await _report_check(ctx, expected)]


# -- money in several currencies -------------------------------------------------------------


async def currency_checks(ctx: GateContext, plan: CurrencyPlan) -> list[Check]:
    """The plan's quotes (instrument marks and FX pairs), its fills, the three surfaces;
    then the FX quotes move and the surfaces must follow."""
    now = time.time_ns()
    for quote in plan.quotes(now):
        await ctx.publish(quote_subject(quote.symbol), quote, msg_id=f"validate:{ctx.run_id}:fx:quote:{quote.symbol}")
    fills = plan.fills(ctx.run_id, now + 1_000_000)
    for fill in fills:
        await ctx.publish(fill_subject(fill.account, fill.symbol), fill, msg_id=f"validate:{fill.fill_id}")
    ctx.state["currency_fills"] = fills
    currencies = sorted({plan.reference.currency(p.symbol) for p in plan.positions})
    bases = sorted({plan.reference.base_currency(a) for a in plan.accounts()})
    first = await _currency_check(
        ctx, "accuracy.currencies",
        "money in other currencies (FX pairs, a fixed rate, a fee in another currency, a currency without a "
        "rate): ptrc /positions, /pnl/summary and pnl /pnl/realtime show the local and base-currency figures "
        "and base totals (missing_rates where a rate is absent) of `positions compute`, exactly",
        plan.expected(fills),
        f"{len(plan.positions)} positions in {', '.join(currencies)}, {len(plan.accounts())} accounts based in "
        f"{', '.join(bases)}",
    )  # fmt: skip
    moved_at = time.time_ns()
    for quote in plan.quotes(moved_at, moved=True):
        await ctx.publish(quote_subject(quote.symbol), quote, msg_id=f"validate:{ctx.run_id}:fx:moved:{quote.symbol}")
    moves = ", ".join(f"{symbol} {canonical(a)} -> {canonical(b)}" for symbol, (a, b) in sorted(plan.fx.items()))
    moved = await _currency_check(
        ctx, "accuracy.fx_move",
        "after the FX quotes move, every base-currency figure and total follows at the new rates (the local "
        "figures of instruments that are not FX pairs stay), on all three surfaces, exactly",
        plan.expected(fills, moved=True), moves,
    )  # fmt: skip
    return [first, moved]


async def _currency_check(ctx: GateContext, name: str, criterion: str, expected: dict[str, Expected],
                          what: str) -> Check:  # fmt: skip
    async def differences() -> tuple[list[Difference], int]:
        found: list[Difference] = []
        compared = 0
        for account_expected in expected.values():
            for surface in (_ptrc_positions, _ptrc_summary, _pnl_realtime):
                more, count = await surface(ctx, account_expected)
                found += more
                compared += count
        return found, compared

    try:
        (found, compared), settled = await settle(differences, lambda r: not r[0], FIRST_TIMEOUT_S)
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    measured = f"{what}; {compared} values compared, " + ("all equal" if settled else f"{len(found)} differ")
    details: dict = {}
    if found and all(d.where.startswith("pnl ") for d in found):
        details["hint"] = ANOTHER_PTRC_HINT
    totals = {account: {key: canonical(value) for key, value in e.account_values().items()
                        if key in ("base_currency", "total_pnl", "missing_rates")}
              for account, e in expected.items()}  # fmt: skip
    details.update(expected_totals=totals, differences=[str(d) for d in found])
    return Check(SECTION, name, criterion, settled, measured, value=len(found), details=details)


async def _real_feed_check(ctx: GateContext, reference: Reference | None = None) -> Check:
    """An opening, a resend, a late fill, a correction and a bust, published in that
    order: ptrc and pnl show what the rule (`core.history`) computes from them."""
    name = "accuracy.real_feed"
    criterion = ("an opening position, a resent fill, a late fill, a correction and a bust: ptrc /positions and "
                 "pnl /pnl/realtime equal a fresh book over the effective history, exactly")  # fmt: skip
    account = ctx.sub_account("FEED")
    symbol = f"VAL{ctx.run_id}-{REAL_FEED_SYMBOL_SUFFIX}"
    now = time.time_ns()
    quote = Quote(ts=now, symbol=symbol, bid=REAL_FEED_BID, ask=REAL_FEED_ASK, bid_size=Decimal(1), ask_size=Decimal(1))
    await ctx.publish(quote_subject(symbol), quote, msg_id=f"validate:{ctx.run_id}:quote:{symbol}")
    messages = real_feed_messages(account, symbol, ctx.run_id, now + 1_000_000)
    for fill, msg_id in messages:
        await ctx.publish(fill_subject(fill.account, fill.symbol), fill, msg_id=msg_id)
    expected = Expected.of_feed(account, [fill for fill, _ in messages], {symbol: quote.mid}, reference)

    async def differences() -> tuple[list[Difference], int]:
        ptrc = await ctx.get_json("ptrc", "/positions", {"account": account, "method": "both"})
        rows = _rows_by_symbol(ptrc.get("positions", []), account)
        found, compared = _compare_positions("ptrc /positions", expected, rows, PTRC_POSITION_FIELDS)
        row = rows.get(symbol) or {}
        found += compare(f"ptrc /positions {symbol}", {"corrections": 1, "busts": 1}, row, ("corrections", "busts"))
        pnl = await ctx.get_json("pnl", "/pnl/realtime", {"account": account})
        more, count = _compare_positions("pnl /pnl/realtime", expected, _rows_by_symbol(pnl.get("positions", []), account),
                                         PNL_POSITION_FIELDS)  # fmt: skip
        return found + more, compared + count + 2

    try:
        (found, compared), settled = await settle(differences, lambda r: not r[0], FIRST_TIMEOUT_S)
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    position = expected.position(symbol)
    measured = (f"{len(messages)} messages; expected net {canonical(position.net_qty)} @ "
                f"{canonical(position.avg_open_price)}, realized {canonical(position.realized_pnl_gross)}; "
                f"{compared} values compared, " + ("all equal" if settled else f"{len(found)} differ"))  # fmt: skip
    return Check(SECTION, name, criterion, settled, measured, value=len(found),
                 details={"differences": [str(d) for d in found]})  # fmt: skip


def _pinned_check(expected: Expected, chosen: list[Scenario]) -> Check:
    differences = pinned_differences(expected, chosen[0].symbol)
    return Check(
        SECTION, "accuracy.expected_values",
        "expected values: the core (`positions compute`) gives the worked example's literal numbers",
        not differences,
        f"{len(chosen)} scenarios, {sum(len(s.trades) for s in chosen)} fills; worked example: "
        + ("net -5 @ 90, realized 150 gross / 146 net, fees 4, unrealized -25, FIFO 150 / -25"
           if not differences else f"{len(differences)} differences"),
        details={"scenarios": [f"{s.symbol}: {s.name}, mark {canonical(s.mark)}" for s in chosen],
                 "differences": [str(d) for d in differences]},
    )  # fmt: skip


async def _surface(ctx: GateContext, name: str, where: str, fetch_differences, expected: Expected, timeout: float) -> Check:
    """Wait until the surface shows exactly the expected values (or time out), then judge."""
    criterion = f"{where} equals the expected values for every test position and the account, exactly"
    try:
        (differences, compared), settled = await settle(lambda: fetch_differences(ctx, expected), lambda r: not r[0], timeout)
    except ServiceError as exc:
        return failed(SECTION, name, criterion, str(exc))
    measured = f"{compared} values compared, " + ("all equal" if settled else f"{len(differences)} differ")
    return Check(SECTION, name, criterion, settled, measured, value=len(differences),
                 details={"differences": [str(d) for d in differences]})  # fmt: skip


def _rows_by_symbol(rows: list[dict], account: str) -> dict[str, dict]:
    return {row.get("symbol"): row for row in rows if row.get("account") == account}


def _compare_positions(where: str, expected: Expected, rows: dict[str, dict], fields) -> tuple[list[Difference], int]:
    differences: list[Difference] = []
    compared = 0
    for symbol in expected.symbols():
        row = rows.get(symbol)
        if row is None:
            differences.append(Difference(f"{where} {symbol}", "(position)", "present", "missing"))
            continue
        differences += compare(f"{where} {symbol}", expected.position_values(symbol), row, fields)
        compared += len(fields)
    extra = sorted(set(rows) - set(expected.symbols()), key=str)
    differences += [Difference(f"{where} {symbol}", "(position)", "absent", "present") for symbol in extra]
    return differences, compared


async def _ptrc_positions(ctx: GateContext, expected: Expected) -> tuple[list[Difference], int]:
    account = expected.account
    body = await ctx.get_json("ptrc", "/positions", {"account": account, "method": "both"})
    return _compare_positions(f"ptrc /positions {account}", expected,
                              _rows_by_symbol(body.get("positions", []), account), PTRC_POSITION_FIELDS)  # fmt: skip


async def _ptrc_summary(ctx: GateContext, expected: Expected) -> tuple[list[Difference], int]:
    account = expected.account
    body = await ctx.get_json("ptrc", "/pnl/summary", {"account": account})
    accounts = [row for row in body.get("by_account", []) if row.get("account") == account]
    where = "ptrc /pnl/summary"
    if len(accounts) != 1:
        return [Difference(f"{where} by_account", account, "1 row", f"{len(accounts)} rows")], 0
    differences = compare(f"{where} by_account {account}", expected.account_values(), accounts[0],
                          PTRC_SUMMARY_ACCOUNT_FIELDS)  # fmt: skip
    compared = len(PTRC_SUMMARY_ACCOUNT_FIELDS)
    # Filtered by the account, by_symbol sums only its positions: one per test symbol.
    by_symbol = {row.get("symbol"): row for row in body.get("by_symbol", [])}
    more, count = _compare_positions(f"{where} by_symbol {account}", expected, by_symbol, PTRC_SUMMARY_SYMBOL_FIELDS)
    return differences + more, compared + count


async def _pnl_realtime(ctx: GateContext, expected: Expected) -> tuple[list[Difference], int]:
    account = expected.account
    body = await ctx.get_json("pnl", "/pnl/realtime", {"account": account})
    where = "pnl /pnl/realtime"
    differences, compared = _compare_positions(f"{where} {account}", expected,
                                               _rows_by_symbol(body.get("positions", []), account),
                                               PNL_POSITION_FIELDS)  # fmt: skip
    accounts = [row for row in body.get("accounts", []) if row.get("account") == account]
    if len(accounts) != 1:
        return differences + [Difference(f"{where} accounts", account, "1 row", f"{len(accounts)} rows")], compared
    differences += compare(f"{where} accounts {account}", expected.account_values(), accounts[0], PNL_ACCOUNT_FIELDS)
    return differences, compared + len(PNL_ACCOUNT_FIELDS)


# -- the report ------------------------------------------------------------------------------


async def generate_report(ctx: GateContext) -> dict[str, Any]:
    """POST /reports for the current trading day (all kinds), timed from this side."""
    started = time.perf_counter()
    status, body = await ctx.post_json("ptrc", "/reports", {})
    seconds = time.perf_counter() - started
    if status != 201:
        raise ServiceError(f"ptrc POST /reports: HTTP {status}: {str(body)[:300]}")
    generation = {"seconds": seconds, "body": body, "load_average_1m": round(os.getloadavg()[0], 2)}
    ctx.state["report_generation"] = generation
    return generation


async def _download_csv(ctx: GateContext, name: str) -> list[dict[str, str]]:
    response = await ctx.get("ptrc", f"/reports/{name}")
    if response.status_code != 200:
        raise ServiceError(f"ptrc GET /reports/{name}: HTTP {response.status_code}: {response.text[:300]}")
    return list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))


async def _report_check(ctx: GateContext, expected: Expected) -> Check:
    name = "accuracy.report"
    criterion = "the generated daily P&L and positions reports hold the expected rows for the test account, exactly"
    try:
        generation = await generate_report(ctx)
        day = generation["body"]["date"]
        daily = [r for r in await _download_csv(ctx, f"{day}/daily_pnl.csv") if r.get("account") == ctx.account]
        positions = [r for r in await _download_csv(ctx, f"{day}/positions.csv") if r.get("account") == ctx.account]
    except (ServiceError, KeyError, TypeError) as exc:
        return failed(SECTION, name, criterion, f"{type(exc).__name__}: {exc}")
    differences: list[Difference] = []
    compared = 0
    position_rows = {r.get("symbol"): r for r in daily if r.get("level") == "position"}
    more, count = _compare_positions("report daily_pnl", expected, position_rows, REPORT_DAILY_POSITION_FIELDS)
    differences += more
    compared += count
    account_rows = [r for r in daily if r.get("level") == "account"]
    if len(account_rows) != 1:
        differences.append(Difference("report daily_pnl account row", ctx.account, "1 row", f"{len(account_rows)} rows"))
    else:
        differences += compare(f"report daily_pnl account {ctx.account}", expected.account_values(), account_rows[0],
                               REPORT_DAILY_ACCOUNT_FIELDS)  # fmt: skip
        compared += len(REPORT_DAILY_ACCOUNT_FIELDS)
    # The positions report lists open positions only.
    open_symbols = [s for s in expected.symbols() if expected.position(s).net_qty]
    rows = {r.get("symbol"): r for r in positions}
    for symbol in open_symbols:
        if symbol not in rows:
            differences.append(Difference(f"report positions {symbol}", "(position)", "present", "missing"))
            continue
        differences += compare(f"report positions {symbol}", expected.position_values(symbol), rows[symbol],
                               REPORT_POSITIONS_FIELDS)  # fmt: skip
        compared += len(REPORT_POSITIONS_FIELDS)
    for symbol in sorted(set(rows) - set(open_symbols), key=str):
        differences.append(Difference(f"report positions {symbol}", "(position)", "absent (flat)", "present"))
    measured = (f"{day}: {len(daily)} daily P&L + {len(positions)} positions rows, {compared} values compared, "
                + ("all equal" if not differences else f"{len(differences)} differ"))  # fmt: skip
    return Check(SECTION, name, criterion, not differences, measured, value=len(differences),
                 details={"differences": [str(d) for d in differences]})  # fmt: skip
