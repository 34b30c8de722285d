"""execution_quality's pages: `/metrics/execution`, `/analytics/summary` and the page's
slippage histogram, and the parsing of their requests (every parameter checked, an
unknown one refused: a typo never silently widens a query). The SQL behind them is
`posttrade.stores.clickhouse.execution_queries`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from ..app import App
from ..stores.clickhouse import ClickHouseError
from ..stores.clickhouse.execution_queries import ExecutionQueries, Filters
from . import params as web_params
from .params import BadRequest, query_int
from .server import JSON

NS = 1_000_000_000


def install_pages(app: App, queries: ExecutionQueries, not_connected: Callable[[], str | None]) -> ExecutionPages:
    """Serve the pages over `queries`; `not_connected()` says why ClickHouse is not
    connected (a 503's reason) while it is not."""
    pages = ExecutionPages(queries, not_connected)
    app.page("/metrics/execution")(pages.metrics_execution)
    app.page("/analytics/summary")(pages.analytics_summary)
    # For the page only (docs/execution_quality.md, "The page"): not in /openapi.json.
    app.page("/dashboard/slippage_histogram", documented=False)(pages.slippage_histogram)
    return pages


class ExecutionPages:
    def __init__(self, queries: ExecutionQueries, not_connected: Callable[[], str | None]):
        self.queries = queries
        self.not_connected = not_connected

    async def metrics_execution(self, request: Request) -> JSON:
        """Execution metrics per fill or per order, newest first, with filters and pagination.

        Money is in the row's `currency` (the instrument's, from the reference data): a
        fill's `fee` is in its `fee_currency` (the instrument's unless the fill said
        otherwise); an order's `fees` are those charged in its `currency` and
        `fees_other` the rest, by currency (`{"USD": "10"}`), left out of
        `implementation_shortfall`.

        ---
        query:
          level: {enum: [fill, order], default: fill, description: one row per fill or per order}
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
          venue: {$ref: Name, description: only this venue}
          side: {enum: [BUY, SELL], description: only this side (lower case is taken too)}
          order_id: {$ref: Id, description: only this order's rows}
          sort: {enum: [newest, worst], default: newest, description: "newest first, or worst first: orders by implementation_shortfall_bps, fills by slippage_bps, highest (costliest) first, rows without one last"}
          from: {$ref: Time, description: "event time from, inclusive (before `to`)"}
          to: {$ref: Time, description: event time to, exclusive}
          limit: {type: integer, minimum: 1, maximum: 1000, default: 100}
          offset: {type: integer, minimum: 0, maximum: 10000000, default: 0}
        responses:
          200: {description: "`total`, `next_offset` and the `rows` (each with its `currency`)", schema: {type: object}}
          503: ClickHouse is not connected or the query failed
        """
        params = request.query_params
        reject_unknown(params, {"level", "limit", "offset", "order_id", "sort", *Filters.PARAMETERS})
        level = params.get("level", "fill")
        if level not in ("fill", "order"):
            raise BadRequest({"parameter": "level", "error": f"must be fill or order, got {level!r}"})
        sort = params.get("sort", "newest")
        if sort not in ("newest", "worst"):
            raise BadRequest({"parameter": "sort", "error": f"must be newest or worst, got {sort!r}"})
        filters = parse_filters(request)
        limit = query_int(request, "limit", 100, minimum=1, maximum=1000)
        offset = query_int(request, "offset", 0, minimum=0, maximum=10_000_000)
        total, rows = await self._query(self.queries.rows(level, filters, limit, offset, worst=sort == "worst"))
        return JSON(
            {
                "level": level,
                "sort": sort,
                "filters": filters.describe(),
                "limit": limit,
                "offset": offset,
                "total": total,
                "next_offset": offset + len(rows) if offset + len(rows) < total else None,
                "rows": rows,
            }
        )

    async def analytics_summary(self, request: Request) -> JSON:
        """Slippage, spread, markouts and fill ratio aggregated by group and time bucket.

        Groups are always split by currency as well: each carries `currency`, and its
        money (`fills.notional`, `fills.fees`, `fills.slippage_bps.cost`,
        `orders.implementation_shortfall.total`, and the notional weights of the
        weighted bps) is in it alone: two currencies are never added. Fees charged in
        another currency than the instrument's are in `fills.fees_other`, by currency.

        ---
        query:
          group_by: {pattern: '^(?!(?:[a-z]+,)*(account|symbol|venue|side),(?:[a-z]+,)*\\1(?:,|$))(?:(?:account|symbol|venue|side)(?:,(?:account|symbol|venue|side))*)?$', description: "comma-separated dimensions out of account, symbol, venue, side, each at most once (default all four; empty: one overall group per currency)"}
          bucket: {$ref: Bucket, description: time bucket}
          account: {$ref: Name, description: only this account}
          symbol: {$ref: Name, description: only this symbol}
          venue: {$ref: Name, description: only this venue}
          side: {enum: [BUY, SELL], description: only this side (lower case is taken too)}
          from: {$ref: Time, description: "event time from, inclusive (before `to`)"}
          to: {$ref: Time, description: event time to, exclusive}
          limit: {type: integer, minimum: 1, maximum: 10000, default: 1000}
          offset: {type: integer, minimum: 0, maximum: 10000000, default: 0}
        responses:
          200: {description: "`total` groups and the page of `groups`, one per key, currency (and bucket)", schema: {type: object}}
          503: ClickHouse is not connected or the query failed
        """
        params = request.query_params
        reject_unknown(params, {"group_by", "bucket", "limit", "offset", *Filters.PARAMETERS})
        group_by = parse_group_by(params.get("group_by"))
        bucket = params.get("bucket")
        bucket_ns = parse_bucket(bucket) if bucket is not None else None
        filters = parse_filters(request)
        limit = query_int(request, "limit", 1000, minimum=1, maximum=10_000)
        offset = query_int(request, "offset", 0, minimum=0, maximum=10_000_000)
        groups = await self._query(self.queries.summary(filters, group_by, bucket_ns))
        page = groups[offset : offset + limit]
        return JSON(
            {
                "group_by": list(group_by),
                "bucket": bucket,
                "filters": filters.describe(),
                "limit": limit,
                "offset": offset,
                "total": len(groups),
                "groups": page,
            }
        )

    async def slippage_histogram(self, request: Request) -> JSON:
        """The distribution of fills' slippage vs arrival (bps) broken down by each key of
        `by` (comma-separated out of account, symbol, venue, side; default venue), for the
        page. One set of bins for every breakdown: `bins` (5-200, default 30) bins of a
        round width (1, 2 or 5 × 10^k bps) over the 1st-99th percentile of the filtered
        fills; a group's fills outside are counted in its `below` / `above`. Same filters
        and the same 400s as /analytics/summary; read from the per-minute rollup when
        `from` / `to` are whole minutes, else from the fills table."""
        params = request.query_params
        reject_unknown(params, {"by", "bins", "limit", *Filters.PARAMETERS})
        by = parse_by(params.get("by"))
        bins = query_int(request, "bins", 30, minimum=5, maximum=200)
        limit = query_int(request, "limit", 50, minimum=1, maximum=1000)
        filters = parse_filters(request)
        answer = await self._query(self.queries.slippage_histogram(filters, by, bins, limit))
        return JSON({"filters": filters.describe(), **answer})

    async def _query(self, coroutine):
        if self.queries.connection() is None:
            coroutine.close()
            raise BadRequest({"error": "ClickHouse is not connected", "reason": self.not_connected()}, status_code=503)
        try:
            return await coroutine
        except ClickHouseError as exc:
            raise BadRequest({"error": "ClickHouse query failed", "reason": str(exc)[:2000]}, status_code=503) from None


# -- request parsing -------------------------------------------------------------------------

_GROUP_KEYS = ("account", "symbol", "venue", "side")
_BUCKET = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d)$")
_UNIT_NS = {"s": NS, "m": 60 * NS, "h": 3600 * NS, "d": 86_400 * NS}


def reject_unknown(params, allowed: set[str]) -> None:
    unknown = sorted(set(params.keys()) - allowed)
    if unknown:
        raise BadRequest({"parameter": unknown[0], "error": f"unknown parameter; allowed: {', '.join(sorted(allowed))}"})


# What the OpenAPI document says of `group_by` (tests/unit/test_auth.py compares them).
GROUP_BY_PATTERN = (
    r"^(?!(?:[a-z]+,)*(account|symbol|venue|side),(?:[a-z]+,)*\1(?:,|$))"
    r"(?:(?:account|symbol|venue|side)(?:,(?:account|symbol|venue|side))*)?$"
)
_group_by = re.compile(GROUP_BY_PATTERN)


def parse_group_by(raw: str | None) -> tuple[str, ...]:
    if raw is None:
        return _GROUP_KEYS
    if not _group_by.fullmatch(raw):
        raise BadRequest(
            {"parameter": "group_by", "error": f"comma-separated keys out of {', '.join(_GROUP_KEYS)}, each at most once; got {raw!r}"}
        )
    return tuple(raw.split(",")) if raw else ()


def parse_by(raw: str | None) -> tuple[str, ...]:
    """`by` of the slippage histogram: one or more breakdowns, each key at most once."""
    if raw is None:
        return ("venue",)
    if not raw or not _group_by.fullmatch(raw):
        raise BadRequest(
            {"parameter": "by", "error": f"comma-separated keys out of {', '.join(_GROUP_KEYS)}, each at most once; got {raw!r}"}
        )
    return tuple(raw.split(","))


def parse_bucket(raw: str) -> int:
    web_params.check_interval("bucket", raw, bucket=True)  # the published pattern, exactly
    match = _BUCKET.match(raw)
    if not match:
        raise BadRequest({"parameter": "bucket", "error": f"must look like 30s, 5m, 1h or 1d, got {raw!r}"})
    value = int(match.group(1)) * _UNIT_NS[match.group(2)]
    if value > 366 * _UNIT_NS["d"]:
        raise BadRequest({"parameter": "bucket", "error": "at most 366 days"})
    return value


def parse_filters(request: Request) -> Filters:
    """The filters a request asks for (`Filters.PARAMETERS` and `order_id`), each checked."""
    p = request.query_params
    values: dict[str, Any] = {}
    for name in ("account", "symbol", "venue", "order_id"):
        raw = p.get(name)
        if raw is not None:
            max_length = web_params.ID_MAX if name == "order_id" else web_params.NAME_MAX
            values[name] = web_params.check_name(name, raw, max_length=max_length)
    side = p.get("side")
    if side is not None:
        if side.upper() not in ("BUY", "SELL"):
            raise BadRequest({"parameter": "side", "error": f"must be BUY or SELL, got {side!r}"})
        values["side"] = side.upper()
    if "from" in p:
        values["from_ns"] = web_params.parse_time("from", p["from"])
    if "to" in p:
        values["to_ns"] = web_params.parse_time("to", p["to"])
    if "from_ns" in values and "to_ns" in values and values["from_ns"] >= values["to_ns"]:
        raise BadRequest({"parameter": "to", "error": "must be after from"})
    return Filters(**values)
