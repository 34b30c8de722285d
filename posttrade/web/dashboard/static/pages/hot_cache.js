// hot_cache: is the cache doing its job? The hit rate and the freshness lag over the last
// hour (/dashboard/history), keys, reads and freshness per family and Valkey's memory
// (/cache/stats), and a symbol's cached bars as candlesticks (/dashboard/bars: /bars
// exactly, but not counted as hits or misses: the hit rate is the desk's, not the page's).
"use strict";
(() => {
  const POLL_MS = 2000;
  // /cache/stats counts the keys with a SCAN of the whole database (a second or more with
  // a few hundred thousand keys in it): read every 10 s, the fast figures come from the
  // history (its samples are in memory and one INFO).
  const STATS_MS = 10000;

  const now = PT.figures(PT.panel("Now", { wide: true }).body);
  const totals = PT.figures(PT.panel("Counters (since start) and keys", { wide: true }).body);
  const percent = (rate) => (rate === null || rate === undefined ? null : `${(rate * 100).toFixed(2)} %`);
  const seconds = (s) => (s === null || s === undefined ? null : `${s} s`);

  const families = PT.table(
    PT.panel("Keys per family", { wide: true }).body,
    [
      { key: "family", label: "family" },
      { key: "keys", label: "keys", numeric: true },
      { key: "hits", label: "hits", numeric: true },
      { key: "misses", label: "misses", numeric: true },
      { key: "hit_rate", label: "hit rate", numeric: true, value: (r) => percent(r.hit_rate) },
      { key: "writes", label: "writes (this process)", numeric: true },
      { key: "freshness_lag_s", label: "freshness lag s", numeric: true },
      { key: "newest", label: "newest event (UTC)", value: (r) => (r.newest_event_ts ? PT.fmtTime(r.newest_event_ts / 1e9) : null) },
    ],
    { key: (r) => r.family, sort: { key: "family" } },
  );

  PT.every(STATS_MS, "/cache/stats", async () => {
    const s = await PT.api("/cache/stats");
    const memory = s.memory || {};
    totals.set({
      hits: s.hits,
      misses: s.misses,
      keys: s.keys,
      "keys in db": s.keys_in_db,
      "peak memory": memory.peak_bytes ? `${(memory.peak_bytes / 2 ** 20).toFixed(1)} MB` : null,
      evictions: s.evictions,
      "read-through queries": s.read_through.queries,
      "read-through errors": s.read_through.errors,
      "cache errors": s.cache_errors,
      valkey: s.valkey && s.valkey.ok ? "up" : `DOWN: ${s.valkey ? s.valkey.error : "?"}`,
    });
    families.setRows(Object.entries(s.families).map(([family, f]) => ({ family, ...f })));
  });

  // -- over time: /dashboard/history -------------------------------------------------------------
  const charts = [
    { title: "Hit rate over time", unit: "%", series: [["hit_rate", "since start"], ["hit_rate_recent", "last interval"]], scale: 100, range: [0, 100] },
    { title: "Freshness lag over time", unit: "seconds", series: [["lag.bars", "bars"], ["lag.quotes", "quotes"], ["lag.positions", "positions"]] },
    { title: "Reads per second", unit: "reads/s", series: [["reads_per_s", "reads/s (all families)"]] },
    { title: "Valkey memory", unit: "MB", series: [["memory_bytes", "used"]], scale: 1 / 2 ** 20 },
  ].map((c) => {
    const panel = PT.panel(c.title);
    const chart = PT.timeChart(panel.body, c.series.map(([, label]) => ({ label })), { yLabel: c.unit, height: 200 });
    chart.box = panel.body.querySelector(".pt-chart");
    chart.box.dataset.chart = c.series[0][0];
    // A rate has a fixed axis (uPlot asks each scale's `range` on every redraw).
    if (c.range) chart.plot.scales.y.range = () => c.range;
    return { ...c, chart };
  });

  PT.every(POLL_MS, "/dashboard/history", async () => {
    const history = await PT.api("/dashboard/history");
    for (const c of charts) {
      const ys = c.series.map(([name]) =>
        (history.series[name] || history.t.map(() => null)).map((v) => (v === null || v === undefined ? null : c.scale ? v * c.scale : v)),
      );
      c.chart.set([history.t, ...ys]);
    }
    const last = (name) => {
      const values = history.series[name] || [];
      return values.length ? values[values.length - 1] : null;
    };
    const memory = last("memory_bytes");
    now.set({
      "hit rate (since start)": percent(last("hit_rate")),
      [`hit rate (last ${history.every_s} s)`]: percent(last("hit_rate_recent")),
      "reads/s": last("reads_per_s"),
      "freshness lag": seconds(last("lag")),
      "memory": memory === null ? null : `${(memory / 2 ** 20).toFixed(1)} MB`,
    });
  });

  // -- a symbol's bars: candlesticks ---------------------------------------------------------------
  const barsPanel = PT.panel("Bars", { wide: true, id: "pt-bars" });
  const symbolList = PT.el("datalist", { id: "pt-symbols" });
  const intervalList = PT.el("datalist", { id: "pt-intervals" });
  const symbolInput = PT.el("input", { id: "pt-symbol", list: "pt-symbols", placeholder: "symbol", size: 18, autocomplete: "off" });
  const intervalInput = PT.el("input", { id: "pt-interval", list: "pt-intervals", placeholder: "1m", size: 6, autocomplete: "off" });
  // Plain text, no min/max: the browser must not refuse what the API would answer with its 400.
  const limitInput = PT.el("input", { id: "pt-limit", inputmode: "numeric", value: "100", size: 5, autocomplete: "off" });
  const showButton = PT.el("button", { id: "pt-show-bars", type: "submit" }, "Show");
  const readInfo = PT.el("span", { id: "pt-bars-info", class: "pt-count" });
  const controls = PT.el(
    "form",
    { class: "pt-controls", novalidate: true },
    PT.el("label", { for: "pt-symbol" }, "symbol"), symbolInput, symbolList,
    PT.el("label", { for: "pt-interval" }, "interval"), intervalInput, intervalList,
    PT.el("label", { for: "pt-limit" }, "bars"), limitInput,
    showButton, readInfo,
  );
  barsPanel.body.append(controls);

  const candleBox = PT.el("div", { id: "pt-candles", class: "pt-candles", "data-points": "0", style: "height: 340px; width: 100%" });
  barsPanel.body.append(candleBox);
  const candleChart = LightweightCharts.createChart(candleBox, {
    autoSize: true,
    layout: { background: { type: "solid", color: "#1a1f29" }, textColor: "#d8dde6", attributionLogo: false },
    grid: { vertLines: { color: "#2a2f3a" }, horzLines: { color: "#2a2f3a" } },
    rightPriceScale: { borderColor: "#2a2f3a" },
    timeScale: { borderColor: "#2a2f3a", timeVisible: true, secondsVisible: true },
    localization: { timeFormatter: (t) => PT.fmtTime(t) },
  });
  const candles = candleChart.addSeries(LightweightCharts.CandlestickSeries, {
    upColor: "#3ecf8e", downColor: "#ff6b6b", borderVisible: false, wickUpColor: "#3ecf8e", wickDownColor: "#ff6b6b",
    // The axis shows the bars' prices as the API gives them, to their own precision.
    priceFormat: { type: "price", precision: 4, minMove: 0.0001 },
  });

  // The newest bars, exactly as the API gives them (decimal strings, never through a float).
  const barTable = PT.table(
    barsPanel.body,
    [
      { key: "time", label: "open time (UTC)", value: (b) => PT.fmtTime(b.ts / 1e9) },
      { key: "open", label: "open", numeric: true },
      { key: "high", label: "high", numeric: true },
      { key: "low", label: "low", numeric: true },
      { key: "close", label: "close", numeric: true },
      { key: "volume", label: "volume", numeric: true },
      { key: "vwap", label: "vwap", numeric: true },
      { key: "count", label: "trades", numeric: true },
    ],
    { key: (b) => String(b.ts), sort: { key: "time", desc: true }, limit: 20, empty: "no bars shown" },
  );

  let selection = null; // {symbol, interval, limit} being shown
  let drawnFor = null; // the selection the chart was last fitted to

  const barsPath = (s) => `/dashboard/bars/${encodeURIComponent(s.symbol)}?interval=${encodeURIComponent(s.interval)}&limit=${encodeURIComponent(s.limit)}`;

  function draw(answer) {
    const key = JSON.stringify(selection);
    // lightweight-charts wants strictly increasing times: one bar per open time, oldest first.
    const seen = new Set();
    const data = [];
    for (const bar of answer.bars) {
      const time = Math.floor(bar.ts / 1e9);
      if (seen.has(time)) continue;
      seen.add(time);
      data.push({ time, open: PT.number(bar.open), high: PT.number(bar.high), low: PT.number(bar.low), close: PT.number(bar.close) });
    }
    data.sort((a, b) => a.time - b.time);
    candles.setData(data);
    if (drawnFor !== key) {
      candleChart.timeScale().fitContent();
      drawnFor = key;
    }
    candleBox.dataset.points = String(data.length);
    candleBox.dataset.last = data.length ? String(data[data.length - 1].time) : "";
    // What the newest bar is now (it moves while it forms): a test sees the chart follow the feed.
    const newest = answer.bars[answer.bars.length - 1];
    candleBox.dataset.newest = newest ? `${newest.ts} ${newest.close} ${newest.volume}` : "";
    barTable.setRows(answer.bars);
    const how = answer.hit ? "hit" : "miss";
    const partial = answer.complete === false ? ", incomplete" : "";
    readInfo.textContent = `${answer.symbol} ${answer.interval}: ${data.length} bars from ${answer.source} (${how}${partial}; not counted in the hit rate)`;
  }

  function clearBars(why) {
    candles.setData([]);
    candleBox.dataset.points = "0";
    candleBox.dataset.last = "";
    candleBox.dataset.newest = "";
    barTable.setRows([]);
    readInfo.textContent = why;
  }

  async function loadBars() {
    if (!selection) return;
    const asked = selection;
    try {
      const answer = await PT.api(barsPath(asked));
      if (asked === selection) draw(answer);
    } catch (exc) {
      // A 4xx is about the request: nothing to draw for it (not the last symbol's bars).
      if (asked === selection && exc.status >= 400 && exc.status < 500) clearBars(`${asked.symbol} ${asked.interval}: no bars`);
      throw exc;
    }
  }

  async function showNow() {
    try {
      await loadBars();
      PT.clearError("bars");
    } catch (exc) {
      PT.showError(exc.body || { error: "page error", detail: String(exc) }, "bars");
    }
  }

  controls.addEventListener("submit", (event) => {
    event.preventDefault();
    // As typed: the service says what is wrong with it (its 400), the page does not guess.
    selection = { symbol: symbolInput.value, interval: intervalInput.value, limit: limitInput.value };
    drawnFor = null;
    showNow();
  });

  let known = {}; // symbol -> intervals held
  function fillIntervals() {
    const intervals = new Set([...(known[symbolInput.value] || []), ...builtIntervals]);
    intervalList.replaceChildren(...[...intervals].map((i) => PT.el("option", { value: i })));
  }
  let builtIntervals = [];
  symbolInput.addEventListener("change", fillIntervals);

  let firstPick = true;
  PT.every(30000, "/dashboard/symbols", async () => {
    const answer = await PT.api("/dashboard/symbols");
    known = answer.symbols;
    builtIntervals = answer.built_intervals;
    symbolList.replaceChildren(...Object.keys(known).map((s) => PT.el("option", { value: s })));
    limitInput.title = `1 to ${answer.bars_kept} bars`;
    fillIntervals();
    if (firstPick) {
      firstPick = false;
      // Start on a symbol whose bars of the default interval are held (a hit, not a read of QuestDB).
      const symbol = Object.keys(known).find((s) => known[s].includes(answer.default_interval)) || Object.keys(known)[0];
      if (symbol && !symbolInput.value) {
        symbolInput.value = symbol;
        intervalInput.value = answer.default_interval;
        limitInput.value = answer.default_limit;
        fillIntervals();
        selection = { symbol, interval: answer.default_interval, limit: String(answer.default_limit) };
        showNow();
      }
    }
  });

  // The chart follows the feed: the selection read again every POLL_MS.
  PT.every(POLL_MS, "bars", loadBars);
})();
