"""The reads behind execution_quality's pages: rows, summaries and the slippage
histogram, computed in ClickHouse SQL over the tables of `execution.py`, and the
filters they share (bound parameters, never text in the SQL)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ...core.exact import format_decimal, round_quotient
from ...core.execution import BPS_PLACES, to_bps
from ...agents.execution.state import MINUTE_NS
from . import ClickHouseError, ClickHouseStore
from .execution import FILLS_TABLE, MINUTES_TABLE, ORDERS_TABLE


@dataclass(frozen=True)
class Filters:
    """What a request narrows the rows to (`PARAMETERS`: the query parameters that set
    them, besides `order_id`, which only /metrics/execution takes)."""

    PARAMETERS = ("account", "symbol", "venue", "side", "from", "to")

    account: str | None = None
    symbol: str | None = None
    venue: str | None = None
    side: str | None = None
    order_id: str | None = None
    from_ns: int | None = None  # inclusive
    to_ns: int | None = None  # exclusive

    def describe(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("account", "symbol", "venue", "side", "order_id")}
        out.update({"from": self.from_ns, "to": self.to_ns})
        return {k: v for k, v in out.items() if v is not None}

    def where(self, time_column: str, *conditions: str) -> tuple[str, dict[str, Any]]:
        """The WHERE clause (with `conditions` of the caller's own) and its parameters."""
        parts, params = list(conditions), {}
        for name in ("account", "symbol", "venue", "side", "order_id"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} = {{{name}:String}}")
                params[name] = value
        if self.from_ns is not None:
            parts.append(f"{time_column} >= fromUnixTimestamp64Nano({{from_ns:Int64}}, 'UTC')")
            params["from_ns"] = self.from_ns
        if self.to_ns is not None:
            parts.append(f"{time_column} < fromUnixTimestamp64Nano({{to_ns:Int64}}, 'UTC')")
            params["to_ns"] = self.to_ns
        return (" WHERE " + " AND ".join(parts)) if parts else "", params


# What /metrics/execution returns per level: (name, SQL expression, kind). Timestamps
# leave as epoch nanoseconds (clickhouse-connect would truncate DateTime64 to µs).
_FILL_FIELDS = (
    ("fill_id", "fill_id", "str"), ("order_id", "order_id", "str"), ("account", "account", "str"),
    ("symbol", "symbol", "str"), ("currency", "currency", "str"), ("venue", "venue", "str"), ("side", "side", "str"),
    ("liquidity", "liquidity", "str"), ("ts", "toUnixTimestamp64Nano(ts)", "int"),
    ("qty", "qty", "dec"), ("price", "price", "dec"), ("fee", "fee", "dec"), ("fee_currency", "fee_currency", "str"),
    ("notional", "notional", "dec"),
    ("arrival_ts", "toUnixTimestamp64Nano(arrival_ts)", "int"), ("arrival_mid", "arrival_mid", "dec"),
    ("slippage_bps", "slippage_bps", "dec"), ("slippage_cost", "slippage_cost", "dec"),
    ("mid_at_fill", "mid_at_fill", "dec"), ("effective_spread_bps", "effective_spread_bps", "dec"),
    ("mid_1s", "mid_1s", "dec"), ("mid_5s", "mid_5s", "dec"), ("mid_60s", "mid_60s", "dec"),
    ("markout_1s_bps", "markout_1s_bps", "dec"), ("markout_5s_bps", "markout_5s_bps", "dec"),
    ("markout_60s_bps", "markout_60s_bps", "dec"), ("complete", "complete", "bool"),
    ("amendments", "amendments", "int"),
)
_ORDER_FIELDS = (
    ("order_id", "order_id", "str"), ("account", "account", "str"), ("symbol", "symbol", "str"),
    ("currency", "currency", "str"), ("venue", "venue", "str"), ("side", "side", "str"),
    ("order_type", "order_type", "str"),
    ("limit_price", "limit_price", "dec"), ("status", "status", "str"), ("qty", "qty", "dec"),
    ("arrival_ts", "toUnixTimestamp64Nano(arrival_ts)", "int"), ("end_ts", "toUnixTimestamp64Nano(end_ts)", "int"),
    ("arrival_mid", "arrival_mid", "dec"), ("fills", "fills", "int"), ("filled_qty", "filled_qty", "dec"),
    ("unfilled_qty", "unfilled_qty", "dec"), ("fill_ratio", "fill_ratio", "dec"),
    ("filled_notional", "filled_notional", "dec"), ("fees", "fees", "dec"), ("fees_other", "fees_other", "map"),
    ("avg_fill_price", "avg_fill_price", "dec"),
    ("first_fill_ts", "toUnixTimestamp64Nano(first_fill_ts)", "int"),
    ("last_fill_ts", "toUnixTimestamp64Nano(last_fill_ts)", "int"),
    ("time_to_first_fill_ns", "time_to_first_fill_ns", "int"), ("time_to_last_fill_ns", "time_to_last_fill_ns", "int"),
    ("market_vwap", "market_vwap", "dec"), ("market_volume", "market_volume", "dec"),
    ("vwap_slippage_bps", "vwap_slippage_bps", "dec"), ("unfilled_price", "unfilled_price", "dec"),
    ("unfilled_price_ts", "toUnixTimestamp64Nano(unfilled_price_ts)", "int"),
    ("benchmark_notional", "benchmark_notional", "dec"), ("execution_cost", "execution_cost", "dec"),
    ("opportunity_cost", "opportunity_cost", "dec"), ("implementation_shortfall", "implementation_shortfall", "dec"),
    ("implementation_shortfall_bps", "implementation_shortfall_bps", "dec"), ("is_final", "is_final", "bool"),
    ("amendments", "amendments", "int"),
)


# A fill removed by a BUST keeps its row (flagged, at a higher version, so FINAL sees the
# flag): every reader of the fills table leaves it out.
_LIVE_FILLS = "busted = 0"


def _out(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "dec":
        return format_decimal(value)
    if kind == "map":
        return _amounts(value)
    if kind == "bool":
        return bool(value)
    return value


def _amounts(by_currency: dict[str, Decimal]) -> dict[str, str]:
    """Money by currency (fees charged in other currencies), sorted by currency."""
    return {currency: format_decimal(by_currency[currency]) for currency in sorted(by_currency)}


def _mean(total: Decimal | None, count: int) -> str | None:
    if not count or total is None:
        return None
    return format_decimal(round_quotient(total, Decimal(count), BPS_PLACES))


class ExecutionQueries:
    """The read side: rows and summaries computed in ClickHouse SQL.

    Sums and exact quantiles come from ClickHouse as Decimals; the few divisions
    (means, weighted means, ratios) are done here exactly (ClickHouse's Decimal
    division truncates at the dividend's scale).

    The fill half of a summary reads the per-minute rollup (`execution_fill_minutes`:
    sums, counts and every slippage value per minute and account / symbol / venue /
    side) when every bucket and bound is a whole number of minutes, since each minute
    then lies wholly inside one bucket and inside or outside the bounds; otherwise it
    reads the fills themselves. Both give the same numbers (a test compares them).
    Busted fills are in neither: the fills table's readers leave out `busted` rows,
    and the rollup is computed without them.

    Every group is also split by `currency` (the instrument's, stored on each row):
    money is only ever summed in one currency. Fees charged in another currency than
    the instrument's (a fill's `fee_currency`) are summed apart, by currency
    (`fees_other`)."""

    def __init__(self, database: str, connection: Callable[[], ClickHouseStore | None]):
        self.database = database
        self.connection = connection

    @property
    def store(self) -> ClickHouseStore:
        store = self.connection()
        if store is None:
            raise ClickHouseError("ClickHouse is not connected")
        return store

    async def rows(
        self, level: str, filters: Filters, limit: int, offset: int, *, worst: bool = False
    ) -> tuple[int, list[dict]]:
        """Newest first, or with `worst` the costliest first (orders by shortfall bps,
        fills by slippage bps; rows without one last, then newest first)."""
        if level == "fill":
            table, fields, order = FILLS_TABLE, _FILL_FIELDS, "ts DESC, fill_id"
            where, params = filters.where("ts", _LIVE_FILLS)
            if worst:
                order = "slippage_bps DESC NULLS LAST, " + order
        else:
            table, fields, order = ORDERS_TABLE, _ORDER_FIELDS, "arrival_ts DESC, order_id"
            where, params = filters.where("arrival_ts")
            if worst:
                order = "implementation_shortfall_bps DESC NULLS LAST, " + order
        source = f"{self.database}.{table} FINAL{where}"
        total = (await self.store.query(f"SELECT count() FROM {source}", params)).scalar()
        select = ", ".join(f"{expr} AS out_{name}" for name, expr, _ in fields)
        result = await self.store.query(
            f"SELECT {select} FROM {source} ORDER BY {order} LIMIT {{limit:UInt64}} OFFSET {{offset:UInt64}}",
            {**params, "limit": limit, "offset": offset},
        )
        rows = [{name: _out(kind, value) for (name, _, kind), value in zip(fields, row)} for row in result.rows]
        return int(total), rows

    async def summary(
        self, filters: Filters, group_by: tuple[str, ...], bucket_ns: int | None, *, use_rollup: bool = True
    ) -> list[dict]:
        """`use_rollup=False` reads the fills table even when the rollup could answer."""
        rollup = use_rollup and whole_minutes(filters, bucket_ns)
        fills = await self._fill_groups(filters, group_by, bucket_ns, rollup)
        orders = await self._order_groups(filters, group_by, bucket_ns)
        keys = sorted(set(fills) | set(orders), key=lambda k: tuple((v is None, v) for v in k))
        out = []
        for key in keys:
            group: dict[str, Any] = dict(zip(group_by, key[: len(group_by)]))
            group["currency"] = key[len(group_by)]
            if bucket_ns is not None:
                group["bucket_start"] = key[-1]
            group["fills"] = fills.get(key, _EMPTY_FILLS)
            group["orders"] = orders.get(key, _EMPTY_ORDERS)
            out.append(group)
        return out

    def _group_sql(self, group_by: tuple[str, ...], bucket_ns: int | None, time_ns: str) -> tuple[str, str]:
        """SELECT prefix and GROUP BY of the keys, then the currency (every group is in
        one), then the bucket; `time_ns` is the row's time in epoch ns."""
        exprs = [*group_by, "currency"]
        if bucket_ns is not None:
            exprs.append(f"intDiv({time_ns}, {{bucket_ns:Int64}}) * {{bucket_ns:Int64}}")
        select = "".join(f"{e} AS g{i}, " for i, e in enumerate(exprs))
        group = (" GROUP BY " + ", ".join(f"g{i}" for i in range(len(exprs)))) if exprs else ""
        return select, group

    # The fill aggregates, in the order `_fill_groups` reads them: over the fills
    # themselves, and the same figures over the rollup's per-minute partial sums.
    _FILL_AGGREGATES = (
        "count() AS n, sum(qty), sum(notional), sumIf(fee, fee_currency = currency), "
        "sumMapIf(map(fee_currency, fee), fee_currency != currency), "
        "count(slippage_bps), sum(slippage_bps), quantilesExact(0.5, 0.95)(slippage_bps), "
        "sum(slippage_cost), sum(arrival_notional), "
        "count(effective_spread_bps), sum(effective_spread_bps), "
        "count(markout_1s_bps), sum(markout_1s_bps), count(markout_5s_bps), sum(markout_5s_bps), "
        "count(markout_60s_bps), sum(markout_60s_bps)"
    )
    _ROLLUP_AGGREGATES = (
        "sum(fills) AS n, sum(qty), sum(notional), sum(fee), sumMap(fees_other), "
        "sum(slippage_count), sum(slippage_sum), quantilesExactArray(0.5, 0.95)(slippage_values), "
        "sum(slippage_cost), sum(arrival_notional), "
        "sum(effective_spread_count), sum(effective_spread_sum), "
        "sum(markout_1s_count), sum(markout_1s_sum), sum(markout_5s_count), sum(markout_5s_sum), "
        "sum(markout_60s_count), sum(markout_60s_sum)"
    )

    async def _fill_groups(self, filters: Filters, group_by, bucket_ns, rollup: bool) -> dict[tuple, dict]:
        if rollup:
            table, time_ns, aggregates = (
                MINUTES_TABLE, "toInt64(toUnixTimestamp(minute)) * 1000000000", self._ROLLUP_AGGREGATES
            )
            where, params = filters.where("minute")
        else:
            table, time_ns, aggregates = FILLS_TABLE, "toUnixTimestamp64Nano(ts)", self._FILL_AGGREGATES
            where, params = filters.where("ts", _LIVE_FILLS)
        select, group = self._group_sql(group_by, bucket_ns, time_ns)
        if bucket_ns is not None:
            params["bucket_ns"] = bucket_ns
        sql = f"SELECT {select}{aggregates} FROM {self.database}.{table} FINAL{where}{group}"
        result = await self.store.query(sql, params)
        width = len(group_by) + 1 + (bucket_ns is not None)
        groups = {}
        for row in result.rows:
            key, v = tuple(row[:width]), row[width:]
            (n, qty, notional, fees, fees_other, slip_n, slip_sum, slip_q, slip_cost, slip_weight, es_n, es_sum,
             m1_n, m1_sum, m5_n, m5_sum, m60_n, m60_sum) = v
            if not n:
                continue  # the one row an ungrouped query returns over nothing
            groups[key] = {
                "count": n,
                "qty": format_decimal(qty),
                "notional": format_decimal(notional),
                "fees": format_decimal(fees),
                "fees_other": _amounts(fees_other),
                "slippage_bps": {
                    "count": slip_n,
                    "mean": _mean(slip_sum, slip_n),
                    "median": format_decimal(slip_q[0]) if slip_n else None,
                    "p95": format_decimal(slip_q[1]) if slip_n else None,
                    "notional_weighted": format_decimal(to_bps(slip_cost, slip_weight)) if slip_n and slip_weight else None,
                    "cost": format_decimal(slip_cost) if slip_n else None,
                },
                "effective_spread_bps": {"count": es_n, "mean": _mean(es_sum, es_n)},
                "markout_bps": {
                    "1s": {"count": m1_n, "mean": _mean(m1_sum, m1_n)},
                    "5s": {"count": m5_n, "mean": _mean(m5_sum, m5_n)},
                    "60s": {"count": m60_n, "mean": _mean(m60_sum, m60_n)},
                },
            }
        return groups

    async def _order_groups(self, filters: Filters, group_by, bucket_ns) -> dict[tuple, dict]:
        where, params = filters.where("arrival_ts")
        select, group = self._group_sql(group_by, bucket_ns, "toUnixTimestamp64Nano(arrival_ts)")
        if bucket_ns is not None:
            params["bucket_ns"] = bucket_ns
        sql = (
            f"SELECT {select}count() AS n, countIf(end_ts IS NOT NULL), sum(qty), sum(filled_qty), sum(fill_ratio), "
            "count(implementation_shortfall), sum(implementation_shortfall), "
            "sumIf(benchmark_notional, implementation_shortfall IS NOT NULL), "
            "count(vwap_slippage_bps), sum(vwap_slippage_bps), "
            "count(time_to_first_fill_ns), sum(time_to_first_fill_ns), "
            "count(time_to_last_fill_ns), sum(time_to_last_fill_ns) "
            f"FROM {self.database}.{ORDERS_TABLE} FINAL{where}{group}"
        )
        result = await self.store.query(sql, params)
        width = len(group_by) + 1 + (bucket_ns is not None)
        groups = {}
        for row in result.rows:
            key, v = tuple(row[:width]), row[width:]
            (n, ended, qty, filled, ratio_sum, is_n, is_sum, is_weight, vw_n, vw_sum,
             first_n, first_sum, last_n, last_sum) = v
            if not n:
                continue
            groups[key] = {
                "count": n,
                "ended": ended,
                "qty": format_decimal(qty),
                "filled_qty": format_decimal(filled),
                "fill_ratio": format_decimal(round_quotient(filled, qty, 12)) if qty else None,
                "mean_fill_ratio": format_decimal(round_quotient(ratio_sum, Decimal(n), 12)),
                "implementation_shortfall": {
                    "count": is_n,
                    "total": format_decimal(is_sum) if is_n else None,
                    "bps": format_decimal(to_bps(is_sum, is_weight)) if is_n and is_weight else None,
                },
                "vwap_slippage_bps": {"count": vw_n, "mean": _mean(vw_sum, vw_n)},
                "time_to_first_fill_ns": {"count": first_n, "mean": first_sum // first_n if first_n else None},
                "time_to_last_fill_ns": {"count": last_n, "mean": last_sum // last_n if last_n else None},
            }
        return groups

    async def slippage_histogram(self, filters: Filters, by: tuple[str, ...], bins: int, limit: int) -> dict:
        """Counts of fills' slippage bps per bin, per group of each key of `by`.

        The bins are chosen once over all filtered fills (`histogram_bins`) and counted
        in ClickHouse with integer arithmetic on the values in units of 10^-8 bps (their
        exact scale), so a value on an edge falls in the bin it starts, never beside it."""
        if whole_minutes(filters, None):
            where, params = filters.where("minute")
            values = (
                f"SELECT account, symbol, venue, side, arrayJoin(slippage_values) AS v "
                f"FROM {self.database}.{MINUTES_TABLE} FINAL{where}"
            )
        else:
            where, params = filters.where("ts", _LIVE_FILLS, "slippage_bps IS NOT NULL")
            values = (
                f"SELECT account, symbol, venue, side, assumeNotNull(slippage_bps) AS v "
                f"FROM {self.database}.{FILLS_TABLE} FINAL{where}"
            )
        stats = await self.store.query(f"SELECT count(), quantilesExact(0.01, 0.5, 0.99)(v) FROM ({values})", params)
        count, (p01, median, p99) = stats.rows[0]
        answer: dict[str, Any] = {"count": int(count), "bin_bps": None, "edges": [], "quantiles": None, "by": {}}
        if not count:
            answer["by"] = {key: [] for key in by}
            return answer
        width, first, last = histogram_bins(Decimal(p01), Decimal(p99), bins)
        units = int(width * BPS_UNITS)
        answer.update(
            bin_bps=format_decimal(width),
            edges=[format_decimal(k * width) for k in range(first, last + 2)],
            quantiles={"p1": format_decimal(p01), "median": format_decimal(median), "p99": format_decimal(p99)},
        )
        # One pass over the values, grouped by every key asked for and the bin; each
        # breakdown is then summed here (a few thousand rows: keys × bins).
        k = bin_sql("v", units)
        keys = ", ".join(by)
        result = await self.store.query(
            f"SELECT {keys}, greatest(least({k}, {last + 1}), {first - 1}) AS b, count() "
            f"FROM ({values}) GROUP BY {keys}, b",
            params,
        )
        breakdowns: dict[str, dict[str, dict]] = {key: {} for key in by}
        for row in result.rows:
            b, n = row[-2], row[-1]
            for key, g in zip(by, row):
                group = breakdowns[key].setdefault(
                    g, {"key": g, "count": 0, "counts": [0] * (last - first + 1), "below": 0, "above": 0}
                )
                group["count"] += n
                if b < first:
                    group["below"] += n
                elif b > last:
                    group["above"] += n
                else:
                    group["counts"][b - first] += n
        for key, groups in breakdowns.items():
            answer["by"][key] = sorted(groups.values(), key=lambda grp: (-grp["count"], grp["key"]))[:limit]
        return answer


BPS_UNITS = 10**8  # slippage bps are stored with 8 decimals (Decimal(38, 8))


def bin_sql(value: str, units: int) -> str:
    """ClickHouse: the index of the bin of `units` × 10^-8 bps that the bps `value` falls
    in, floor(value / width), in integers (exact; `intDiv` truncates toward zero)."""
    a = f"toInt128({value} * {BPS_UNITS})"
    return f"(intDiv({a}, {units}) - if({a} % {units} < 0, 1, 0))"


_NICE = (1, 2, 5)  # bin widths are these × 10^k bps


def histogram_bins(low: Decimal, high: Decimal, bins: int) -> tuple[Decimal, int, int]:
    """A round bin width (1, 2 or 5 × 10^k bps, at least 10^-8) giving at most about
    `bins` bins over [low, high], and the first and last bin index (bin k is
    [k × width, (k + 1) × width)), so that low and high both fall in a bin."""
    span = max(high - low, Decimal(0))
    target = span / bins if span else Decimal(1)
    width = None
    exponent = max(target.adjusted(), -8)
    while width is None:
        for nice in _NICE:
            candidate = Decimal(nice).scaleb(exponent)
            if candidate >= target:
                width = candidate
                break
        exponent += 1
    return width, int((low / width).to_integral_value(rounding="ROUND_FLOOR")), int(
        (high / width).to_integral_value(rounding="ROUND_FLOOR")
    )


def whole_minutes(filters: Filters, bucket_ns: int | None) -> bool:
    """Whether the rollup answers exactly: buckets and bounds on whole minutes."""
    return all(
        value is None or value % MINUTE_NS == 0 for value in (bucket_ns, filters.from_ns, filters.to_ns)
    )


_EMPTY_FILLS = {"count": 0}
_EMPTY_ORDERS = {"count": 0}
