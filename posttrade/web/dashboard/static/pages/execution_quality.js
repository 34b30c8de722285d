// execution_quality: transaction-cost analysis at a glance. Every figure is the API's:
// /analytics/summary (overview by currency, markouts by venue), /dashboard/slippage_histogram
// (slippage distributions), /metrics/execution (recent and worst orders, an order's fills).
// Filters live in the URL hash (#venue=XNAS&window=1h&order=O1) and go to the API as they
// are typed, so bad input gets the API's own 400, shown in the banner. Summaries poll
// every 5 s, the histograms every 10 s, orders every 3 s (never while the tab is hidden).
"use strict";
(() => {
  const WINDOWS = { "15m": 15, "1h": 60, "6h": 360, "24h": 1440, all: null };
  const TOP = 6; // groups drawn per histogram; the rest are summed into "other"
  const TOP_VENUES = 8; // lines in the markout chart (the table below has every venue)
  const HORIZONS = ["1s", "5s", "60s"];

  // -- state: the URL hash ----------------------------------------------------------------
  function readState() {
    const p = new URLSearchParams(location.hash.slice(1));
    const win = p.get("window");
    return {
      account: p.get("account") || "", venue: p.get("venue") || "", symbol: p.get("symbol") || "",
      side: p.get("side") || "", window: win in WINDOWS ? win : "1h", order: p.get("order") || "",
    };
  }
  let state = readState();

  function hashOf(next) {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(next)) if (v) p.set(k, v);
    return "#" + p.toString();
  }

  // The filters as the API takes them. Values go as typed (not trimmed): the API says
  // what is wrong with them. `from` is whole minutes, so summaries read the rollup.
  function query(extra = {}) {
    const p = new URLSearchParams();
    for (const k of ["account", "venue", "symbol", "side"]) if (state[k] !== "") p.set(k, state[k]);
    const minutes = WINDOWS[state.window];
    if (minutes) p.set("from", String((BigInt(Math.floor(Date.now() / 60000)) - BigInt(minutes)) * 60000000000n));
    for (const [k, v] of Object.entries(extra)) p.set(k, v);
    return p.toString();
  }

  // -- formatting ---------------------------------------------------------------------------
  // Times are epoch ns (JSON numbers: past 2^53, so only good to a few hundred ns; shown to the ms).
  const clock = (ns) => (ns === null || ns === undefined ? null : new Date(ns / 1e6).toISOString().slice(11, 23));
  const ms = (ns) => (ns === null || ns === undefined ? null : Math.round(ns / 1e6));
  const withUnit = (value, unit) => (value === null || value === undefined ? null : `${value} ${unit}`);
  const orderLink = (row) => hashOf({ ...state, order: row.order_id });

  // -- the panels -------------------------------------------------------------------------------
  const controls = PT.panel("Filters", { wide: true });
  const form = PT.el("form", { class: "pt-controls", id: "eq-filters" });
  const inputs = {};
  for (const [name, placeholder] of [["account", "any account"], ["venue", "any venue"], ["symbol", "any symbol"]]) {
    inputs[name] = PT.el("input", { name, id: `eq-${name}`, placeholder, autocomplete: "off", size: 18 });
    form.append(PT.el("label", { for: `eq-${name}` }, name), inputs[name]);
  }
  inputs.side = PT.el("select", { name: "side", id: "eq-side" },
    ...["", "BUY", "SELL"].map((v) => PT.el("option", { value: v }, v || "both sides")));
  inputs.window = PT.el("select", { name: "window", id: "eq-window" },
    ...Object.keys(WINDOWS).map((v) => PT.el("option", { value: v }, v === "all" ? "all time" : `last ${v}`)));
  form.append(PT.el("label", { for: "eq-side" }, "side"), inputs.side, PT.el("label", { for: "eq-window" }, "window"),
    inputs.window, PT.el("button", { type: "submit" }, "Apply"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = { ...state };
    for (const [k, input] of Object.entries(inputs)) next[k] = input.value;
    location.hash = hashOf(next);
  });
  inputs.side.addEventListener("change", () => form.requestSubmit());
  inputs.window.addEventListener("change", () => form.requestSubmit());
  controls.body.append(form);
  const totals = PT.figures(controls.body);

  const overview = PT.table(PT.panel("Overview by currency (bps; notional in the currency)", { wide: true }).body, [
    { key: "currency", label: "currency" },
    { key: "fills", label: "fills", numeric: true, value: (g) => g.fills.count },
    { key: "notional", label: "notional", numeric: true, value: (g) => g.fills.notional },
    { key: "slip_mean", label: "slippage mean", numeric: true, signed: "cost", value: (g) => g.fills.slippage_bps?.mean },
    { key: "slip_median", label: "median", numeric: true, signed: "cost", value: (g) => g.fills.slippage_bps?.median },
    { key: "slip_p95", label: "p95", numeric: true, signed: "cost", value: (g) => g.fills.slippage_bps?.p95 },
    { key: "spread", label: "eff. spread", numeric: true, value: (g) => g.fills.effective_spread_bps?.mean },
    ...HORIZONS.map((h) => ({ key: `m${h}`, label: `markout +${h}`, numeric: true, signed: true, value: (g) => g.fills.markout_bps?.[h]?.mean })),
    { key: "orders", label: "orders", numeric: true, value: (g) => g.orders.count },
    { key: "fill_ratio", label: "fill ratio", numeric: true, value: (g) => g.orders.fill_ratio },
    { key: "is_bps", label: "shortfall bps", numeric: true, signed: "cost", value: (g) => g.orders.implementation_shortfall?.bps },
  ], { key: (g) => g.currency, sort: { key: "fills", desc: true }, empty: "no fills in this window" });

  // Slippage distributions: one chart per breakdown, each group's share of its fills per bin.
  const histograms = ["venue", "side", "account"].map((by) => {
    const panel = PT.panel(`Slippage vs arrival by ${by} (bps, % of fills)`, { id: `eq-hist-${by}` });
    const note = PT.el("div", { class: "pt-count" });
    panel.body.append(note);
    return { by, panel, note, chart: null, labels: "" };
  });

  const markoutPanel = PT.panel("Markout curve by venue (bps, + = favourable)", { id: "eq-markouts" });
  let markoutChart = null;
  let markoutLabels = "";

  const markoutTable = PT.table(PT.panel("Markouts and spread by venue (bps)", { wide: true }).body, [
    { key: "venue", label: "venue" },
    { key: "currency", label: "currency" },
    { key: "fills", label: "fills", numeric: true, value: (g) => g.fills.count },
    { key: "slip", label: "slippage mean", numeric: true, signed: "cost", value: (g) => g.fills.slippage_bps?.mean },
    { key: "spread", label: "eff. spread", numeric: true, value: (g) => g.fills.effective_spread_bps?.mean },
    ...HORIZONS.map((h) => ({ key: `m${h}`, label: `markout +${h}`, numeric: true, signed: true, value: (g) => g.fills.markout_bps?.[h]?.mean })),
    { key: "is_bps", label: "shortfall bps", numeric: true, signed: "cost", value: (g) => g.orders.implementation_shortfall?.bps },
  ], { key: (g) => `${g.venue}|${g.currency}`, sort: { key: "fills", desc: true }, filter: true });

  const orderColumns = [
    { key: "arrival_ts", label: "arrival (UTC)", value: (r) => clock(r.arrival_ts) },
    { key: "order_id", label: "order", link: orderLink },
    { key: "account", label: "account" },
    { key: "symbol", label: "symbol" },
    { key: "venue", label: "venue" },
    { key: "side", label: "side" },
    { key: "status", label: "status" },
    { key: "qty", label: "qty", numeric: true },
    { key: "fill_ratio", label: "fill ratio", numeric: true },
    { key: "vwap_slippage_bps", label: "vs VWAP bps", numeric: true, signed: "cost" },
    { key: "implementation_shortfall_bps", label: "shortfall bps", numeric: true, signed: "cost" },
    { key: "first_fill_ms", label: "1st fill ms", numeric: true, value: (r) => ms(r.time_to_first_fill_ns) },
  ];
  const worstPanel = PT.panel("Worst orders by implementation shortfall (bps)", { wide: true, id: "eq-worst" });
  const worst = PT.table(worstPanel.body, orderColumns, {
    key: (r) => r.order_id, sort: { key: "implementation_shortfall_bps", desc: true }, empty: "no orders with a shortfall",
  });

  const fillsPanel = PT.panel("Fills of order", { wide: true, id: "eq-order" });
  const fillsHead = PT.el("div", { class: "pt-controls" });
  fillsPanel.body.append(fillsHead);
  const orderFigures = PT.figures(fillsPanel.body);
  const fills = PT.table(fillsPanel.body, [
    { key: "ts", label: "time (UTC)", value: (r) => clock(r.ts) },
    { key: "fill_id", label: "fill" },
    { key: "venue", label: "venue" },
    { key: "liquidity", label: "liq." },
    { key: "qty", label: "qty", numeric: true },
    { key: "price", label: "price", numeric: true },
    { key: "fee", label: "fee", numeric: true },
    { key: "arrival_mid", label: "arrival mid", numeric: true },
    { key: "slippage_bps", label: "slippage bps", numeric: true, signed: "cost" },
    { key: "slippage_cost", label: "slippage cost", numeric: true, signed: "cost" },
    { key: "effective_spread_bps", label: "eff. spread", numeric: true },
    ...HORIZONS.map((h) => ({ key: `markout_${h}_bps`, label: `markout +${h}`, numeric: true, signed: true })),
    { key: "complete", label: "complete", value: (r) => (r.complete ? "yes" : "waiting") },
    { key: "amendments", label: "amended", numeric: true },
  ], { key: (r) => r.fill_id, sort: { key: "ts", desc: false }, empty: "no fills for this order" });

  const recent = PT.table(PT.panel("Recent orders (newest 200)", { wide: true, id: "eq-recent" }).body, orderColumns, {
    key: (r) => r.order_id, sort: { key: "arrival_ts", desc: true }, filter: true, empty: "no orders in this window",
  });

  // -- loading --------------------------------------------------------------------------------
  // A 400 is about the filters: shown once, under "filters", whichever panel met it, and
  // cleared by a panel that read with the filters as they are now (`generation` counts
  // their changes: an answer to the filters before says nothing about these).
  let generation = 0;
  function guarded(load, { filtered = true } = {}) {
    return async () => {
      const asked = generation;
      try {
        await load();
        if (filtered && asked === generation) PT.clearError("filters");
      } catch (exc) {
        if (exc instanceof PT.ApiError && exc.status === 400) {
          if (asked === generation) PT.showError(exc.body, "filters");
          return;
        }
        throw exc;
      }
    };
  }

  async function loadSummary() {
    const [total, venues] = await Promise.all([
      PT.api(`/analytics/summary?${query({ group_by: "" })}`),
      PT.api(`/analytics/summary?${query({ group_by: "venue" })}`),
    ]);
    overview.setRows(total.groups);
    const sum = (f) => total.groups.reduce((n, g) => n + f(g), 0);
    totals.set({
      fills: sum((g) => g.fills.count), orders: sum((g) => g.orders.count),
      "orders ended": sum((g) => g.orders.ended || 0), currencies: total.groups.length, venues: new Set(venues.groups.filter((g) => g.fills.count).map((g) => g.venue)).size,
    });
    markoutTable.setRows(venues.groups.filter((g) => g.fills.count));
    drawMarkouts(venues.groups);
  }

  // One line per venue over +1 s, +5 s, +60 s: the mean markout of its fills (a venue
  // trading in two currencies has two groups: bps add across them, weighted by count).
  function drawMarkouts(groups) {
    const byVenue = new Map();
    for (const g of groups) {
      if (!g.fills.count) continue;
      const v = byVenue.get(g.venue) || { venue: g.venue, fills: 0, sums: HORIZONS.map(() => [0, 0]) };
      v.fills += g.fills.count;
      HORIZONS.forEach((h, i) => {
        const m = g.fills.markout_bps?.[h];
        if (m && m.count && m.mean !== null) {
          v.sums[i][0] += Number(m.mean) * m.count;
          v.sums[i][1] += m.count;
        }
      });
      byVenue.set(g.venue, v);
    }
    const venues = [...byVenue.values()].sort((a, b) => b.fills - a.fills || a.venue.localeCompare(b.venue)).slice(0, TOP_VENUES);
    const labels = venues.map((v) => v.venue).join("|");
    if (!markoutChart || labels !== markoutLabels) {
      markoutPanel.body.replaceChildren();
      markoutChart = PT.xyChart(markoutPanel.body, venues.map((v) => ({ label: v.venue })), {
        xLabel: "horizon", yLabel: "bps", ticks: { 0: "+1 s", 1: "+5 s", 2: "+60 s" }, points: true,
      });
      markoutLabels = labels;
    }
    markoutChart.set([[0, 1, 2], ...venues.map((v) => v.sums.map(([s, n]) => (n ? s / n : null)))]);
  }

  async function loadHistograms() {
    const answer = await PT.api(`/dashboard/slippage_histogram?${query({ by: "venue,side,account", limit: "1000" })}`);
    const edges = answer.edges.map(Number);
    for (const h of histograms) {
      let groups = answer.by[h.by] || [];
      if (groups.length > TOP) {
        const rest = groups.slice(TOP);
        const other = { key: `other (${rest.length})`, count: 0, counts: rest[0].counts.map(() => 0), below: 0, above: 0 };
        for (const g of rest) {
          other.count += g.count; other.below += g.below; other.above += g.above;
          g.counts.forEach((n, i) => { other.counts[i] += n; });
        }
        groups = [...groups.slice(0, TOP), other];
      }
      const labels = groups.map((g) => g.key).join("|");
      if (!h.chart || labels !== h.labels) {
        h.panel.body.replaceChildren(h.note);
        h.chart = PT.xyChart(h.panel.body, groups.map((g) => ({ label: g.key })), { xLabel: "bps", yLabel: "% of fills", stepped: true });
        h.labels = labels;
      }
      // Each bin's share of the group's fills, drawn from its lower edge to the next; the
      // last edge closes the last bin.
      h.chart.set([edges, ...groups.map((g) => [...g.counts.map((n) => (100 * n) / g.count), 0])]);
      const outside = groups.reduce((n, g) => n + g.below + g.above, 0);
      h.note.textContent = answer.count
        ? `${answer.count} fills · bins of ${answer.bin_bps} bps over p1 ${answer.quantiles.p1} … p99 ${answer.quantiles.p99}` +
          ` · median ${answer.quantiles.median} · ${outside} outside`
        : "no fills with an arrival mid in this window";
    }
  }

  async function loadOrders() {
    const [newest, costliest] = await Promise.all([
      PT.api(`/metrics/execution?${query({ level: "order", limit: "200" })}`),
      PT.api(`/metrics/execution?${query({ level: "order", sort: "worst", limit: "20" })}`),
    ]);
    recent.setRows(newest.rows);
    worst.setRows(costliest.rows.filter((r) => r.implementation_shortfall_bps !== null));
  }

  async function loadOrder() {
    if (!state.order) return;
    const id = encodeURIComponent(state.order);
    const [order, its] = await Promise.all([
      PT.api(`/metrics/execution?level=order&order_id=${id}&limit=1`),
      PT.api(`/metrics/execution?order_id=${id}&limit=1000`),
    ]);
    const o = order.rows[0];
    orderFigures.set(o ? {
      account: o.account, symbol: o.symbol, side: o.side, status: o.status, qty: o.qty, filled: o.filled_qty,
      "fill ratio": o.fill_ratio, "avg price": o.avg_fill_price, "arrival mid": o.arrival_mid,
      // Costs carry their unit: the figures' green/red is for gains, and a cost is not one.
      shortfall: withUnit(o.implementation_shortfall, o.currency), "shortfall bps": withUnit(o.implementation_shortfall_bps, "bps"),
      "vs VWAP": withUnit(o.vwap_slippage_bps, "bps"),
    } : { order: "not found" });
    fills.setRows(its.rows);
  }

  const loaders = [
    ["summary", guarded(loadSummary), 5000],
    ["slippage histogram", guarded(loadHistograms), 10000], // a distribution over the window: slow to move
    ["orders", guarded(loadOrders), 3000],
    ["order fills", guarded(loadOrder, { filtered: false }), 3000],
  ];

  function showState() {
    for (const [k, input] of Object.entries(inputs)) input.value = state[k];
    fillsPanel.section.hidden = !state.order;
    if (state.order) {
      fillsPanel.head.textContent = `Fills of order ${state.order}`;
      fillsHead.replaceChildren(PT.el("a", { href: hashOf({ ...state, order: "" }), id: "eq-close-order" }, "close"));
    }
  }

  window.addEventListener("hashchange", () => {
    const before = state.order;
    state = readState();
    generation += 1;
    showState();
    if (state.order !== before) { fills.setRows([]); orderFigures.set({}); }
    if (state.order && state.order !== before) fillsPanel.section.scrollIntoView({ block: "start" });
    // Now, not at the next tick: the user just asked.
    for (const [where, load] of loaders) {
      load().then(() => PT.clearError(where), (exc) => PT.showError(exc.body || { error: "page error", detail: String(exc) }, where));
    }
  });

  showState();
  for (const [where, load, every] of loaders) PT.every(every, where, load);
})();
