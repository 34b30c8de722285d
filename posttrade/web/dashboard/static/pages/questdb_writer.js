// questdb_writer: what reaches QuestDB, per table — rows/s, flush latency, lag, retries and
// dead letters over the last hour (/dashboard/history), and the current counters (/stats).
"use strict";
(() => {
  const totals = PT.figures(PT.panel("Totals", { wide: true }).body);

  const charts = [
    ["Rows per second", "rows_per_s", "rows/s"],
    ["Flush latency p99", "flush_p99_ms", "ms"],
    ["Lag (messages not yet written)", "lag", "messages"],
    ["Retries and dead letters", ["retries", "dead_lettered"], "count"],
  ].map(([title, figure, unit]) => ({ panel: PT.panel(title), figures: [].concat(figure), unit, chart: null }));

  const tables = PT.table(
    PT.panel("Tables", { wide: true }).body,
    [
      { key: "table", label: "table" },
      { key: "stream", label: "stream" },
      { key: "rows", label: "rows", numeric: true },
      { key: "rate", label: "rows/s (10 s)", numeric: true, value: (r) => r.rows_per_s["10s"] },
      { key: "p50", label: "flush p50 ms", numeric: true, value: (r) => r.flush_latency_ms.p50 },
      { key: "p99", label: "flush p99 ms", numeric: true, value: (r) => r.flush_latency_ms.p99 },
      { key: "lag", label: "lag", numeric: true },
      { key: "retries", label: "retries", numeric: true },
      { key: "dead", label: "dead letters", numeric: true, value: (r) => r.dead_lettered + r.dead_lettered_undecodable },
      { key: "last_error", label: "last error" },
    ],
    { key: (r) => r.table, sort: { key: "table" } },
  );

  PT.every(2000, "/stats", async () => {
    const stats = await PT.api("/stats");
    const t = stats.totals;
    totals.set({
      rows: t.rows, "rows/s (10 s)": t.rows_per_s["10s"], "rows/s (60 s)": t.rows_per_s["60s"], lag: t.lag,
      errors: t.errors, retries: t.retries, "dead letters": t.dead_lettered, resends: t.resends,
    });
    tables.setRows(Object.values(stats.tables));
  });

  PT.every(2000, "/dashboard/history", async () => {
    const history = await PT.api("/dashboard/history");
    const tableNames = [...new Set(Object.keys(history.series).map((name) => name.split(".")[0]))].sort();
    for (const c of charts) {
      const names = tableNames.flatMap((table) => c.figures.map((f) => `${table}.${f}`));
      if (!c.chart || c.names.join() !== names.join()) {
        c.panel.body.replaceChildren();
        c.chart = PT.timeChart(c.panel.body, names.map((label) => ({ label })), { yLabel: c.unit });
        c.names = names;
      }
      c.chart.set([history.t, ...names.map((name) => history.series[name])]);
    }
  });
})();
