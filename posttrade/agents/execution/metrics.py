"""execution_quality's own Prometheus metrics, from the tracker's and the sink's counters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ...stores.clickhouse.execution import FILLS_TABLE, ORDERS_TABLE

if TYPE_CHECKING:
    from ...stores.clickhouse.execution_sink import ExecutionSink
    from .tracker import ExecutionTracker


class ExecutionCollector:
    """The tracker's and the sink's counters as Prometheus metrics, read at scrape time
    (`posttrade_execution_*`: the dashboards read them)."""

    def __init__(self, tracker: ExecutionTracker, sink: ExecutionSink):
        self.tracker = tracker
        self.sink = sink

    def collect(self):
        tracker, sink = self.tracker, self.sink
        t, w = tracker.stats, sink.writes
        events = CounterMetricFamily("posttrade_execution_events", "Events folded into the join", labels=["kind"])
        for kind, value in (
            ("fill", t.fills), ("correction", t.corrections), ("bust", t.busts), ("order", t.orders),
            ("quote", t.quotes), ("market_trade", t.market_trades),
        ):
            events.add_metric([kind], value)
        yield events
        skipped = CounterMetricFamily(
            "posttrade_execution_skipped_events", "Events that changed nothing", labels=["kind", "reason"]
        )
        for (kind, reason), value in sorted(t.skipped_fills.items()):
            skipped.add_metric([kind, reason], value)
        for kind, reason, value in (
            ("quote", "duplicate", t.duplicate_quotes),
            ("market_trade", "duplicate", t.duplicate_trades),
            ("quote", "late", t.late_quotes),
            ("market_trade", "late", t.late_trades),
        ):
            skipped.add_metric([kind, reason], value)
        yield skipped
        yield CounterMetricFamily(
            "posttrade_execution_unavailable_mids", "Mids decided as unknown (no quote at or before the time)",
            value=t.unavailable_mids,
        )
        rows = CounterMetricFamily("posttrade_execution_rows_written", "Rows written to ClickHouse", labels=["table"])
        rows.add_metric([FILLS_TABLE], w.fill_rows)
        rows.add_metric([ORDERS_TABLE], w.order_rows)
        yield rows
        yield CounterMetricFamily("posttrade_execution_write_errors", "Failed ClickHouse writes (retried)", value=sink.stats.errors)
        yield CounterMetricFamily("posttrade_execution_rows_rejected", "Rows that could never be written", value=t.rows_rejected)
        yield CounterMetricFamily(
            "posttrade_execution_rows_held",
            "Rows not written because ClickHouse has the row further along (after a restart)",
            value=w.rows_held,
        )
        yield GaugeMetricFamily(
            "posttrade_execution_rollup_minutes_stale", "Rollup minutes waiting for their refresh",
            value=len(sink.stale_minutes),
        )
        yield CounterMetricFamily(
            "posttrade_execution_write_seconds", "Time spent in ClickHouse writes", value=w.write_seconds_total
        )
        pending = GaugeMetricFamily("posttrade_execution_waiting", "Fills and orders waiting for event time", labels=["series"])
        pending.add_metric(["quotes"], len(tracker.quote_waits))
        pending.add_metric(["market_trades"], len(tracker.trade_waits))
        yield pending
        yield GaugeMetricFamily(
            "posttrade_execution_amendments_waiting", "Corrections and busts kept until their execution arrives",
            value=len(tracker.waiting),
        )
        held = GaugeMetricFamily("posttrade_execution_held", "Fills and orders held in state", labels=["kind"])
        held.add_metric(["fill"], len(tracker.fills))
        held.add_metric(["order"], len(tracker.orders))
        yield held
        pruned = CounterMetricFamily(
            "posttrade_execution_pruned", "Fills and orders forgotten: retention_s up, or beyond max_fills / max_orders",
            labels=["kind", "reason"],
        )
        pruned.add_metric(["fill", "retention"], t.pruned_fills - t.pruned_fills_capacity)
        pruned.add_metric(["fill", "capacity"], t.pruned_fills_capacity)
        pruned.add_metric(["order", "retention"], t.pruned_orders - t.pruned_orders_capacity)
        pruned.add_metric(["order", "capacity"], t.pruned_orders_capacity)
        yield pruned
        # Of the capacity ones: orders whose NEW was never seen, with their fills (rows
        # without arrival values). Rising: the orders stream runs ahead of the fills
        # stream by more than max_orders covers (docs/execution_quality.md, "Bounded state").
        unjoined = CounterMetricFamily(
            "posttrade_execution_pruned_unjoined",
            "Of the capacity prunes: orders whose NEW was never seen, and their fills", labels=["kind"],
        )
        unjoined.add_metric(["fill"], t.pruned_unjoined_fills)
        unjoined.add_metric(["order"], t.pruned_unjoined_orders)
        yield unjoined
        history = GaugeMetricFamily("posttrade_execution_history_points", "Series points kept in memory", labels=["series"])
        history.add_metric(["quotes"], tracker.quotes.total_points())
        history.add_metric(["market_trades"], tracker.trades.total_points())
        yield history
