// ptrc: the desk's positions and what happened to them. Every figure is the API's:
// - positions blotter: /live/positions (a row as /positions gives it, sent when a fill,
//   an amendment or the day's roll changes the position, and when its mark moves); with an
//   account chosen, /positions?account= every 3 s as well (so a bad name gets the API's 400);
// - accounts in base currency: /pnl/summary every 3 s;
// - compliance alerts: /compliance/alerts (stored), then /live/alerts as they are raised;
// - fill flow over the last hour: /dashboard/history; counts: /stats;
// - corrections, busts and amendments: /amendments every 5 s;
// - reconciliation runs and their breaks: /reconciliation, /reconciliation/{id};
// - reports: /reports, downloaded with the token (PT.download).
// The account filter lives in the URL hash (#account=NAME, with &money=local or &money=base
// for one currency in the blotter) and goes to the API as typed.
"use strict";
(() => {
  const KEPT_ROWS = 1000; // blotter rows kept without an account chosen: the last updated
  const REDRAW_MS = 500; // the blotter takes the live rows at most twice a second
  const SHOWN_ROWS = 100; // rows drawn at once (the count says how many more there are: filter or sort)

  // -- state: the URL hash (#account=NAME&money=local) -----------------------------------------
  const MONEY = { both: "local and base", local: "local currency", base: "base currency" };
  const hash = () => new URLSearchParams(location.hash.slice(1));
  const readAccount = () => hash().get("account") || "";
  const account = readAccount();
  const money = hash().get("money") in MONEY ? hash().get("money") : "both";
  const mine = (item) => !account || item.account === account;
  const withAccount = (path, extra = {}) => {
    const p = new URLSearchParams(extra);
    if (account) p.set("account", account);
    const q = p.toString();
    return q ? `${path}?${q}` : path;
  };
  function go(next) {
    const p = new URLSearchParams();
    if (next.account) p.set("account", next.account);
    if (next.money && next.money !== "both") p.set("money", next.money);
    history.pushState(null, "", `${location.pathname}${location.search}#${p}`);
    location.reload(); // the page starts again from the new choice (its live streams too)
  }

  // -- formatting ---------------------------------------------------------------------------
  // Times are epoch ns (JSON numbers past 2^53: good to a few hundred ns; shown to the ms).
  const clock = (ns) => (ns === null || ns === undefined ? null : new Date(ns / 1e6).toISOString().replace("T", " ").slice(0, 23));
  const time = (ns) => (ns === null || ns === undefined ? null : clock(ns).slice(11));
  const iso = (text) => (text ? text.replace("T", " ").slice(0, 19) : null);
  const posKey = (row) => JSON.stringify([row.account, row.symbol]);
  const bytes = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} kB` : `${n} B`);

  // -- the filter ---------------------------------------------------------------------------
  const controls = PT.panel("Account", { wide: true, id: "ptrc-controls" });
  const form = PT.el("form", { class: "pt-controls", id: "ptrc-filter" });
  const accountInput = PT.el("input", { id: "ptrc-account", name: "account", placeholder: "every account", autocomplete: "off", size: 28 });
  const clear = PT.el("button", { type: "button", id: "ptrc-clear" }, "All accounts");
  const moneySelect = PT.el("select", { id: "ptrc-money", name: "money" },
    ...Object.entries(MONEY).map(([value, label]) => PT.el("option", { value }, `P&L in ${label}`)));
  form.append(PT.el("label", { for: "ptrc-account" }, "account"), accountInput, PT.el("button", { type: "submit" }, "Show"), clear,
    PT.el("label", { for: "ptrc-money" }, "blotter"), moneySelect);
  accountInput.value = account;
  moneySelect.value = money;
  // The name goes to the API as typed (not trimmed): the API says what is wrong with it.
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    go({ account: accountInput.value, money: moneySelect.value });
  });
  clear.addEventListener("click", () => go({ money: moneySelect.value }));
  moneySelect.addEventListener("change", () => go({ account, money: moneySelect.value }));
  window.addEventListener("hashchange", () => location.reload()); // the hash edited by hand, or back
  controls.body.append(form);
  const counts = PT.figures(controls.body);

  // -- accounts in base currency -------------------------------------------------------------
  const accounts = PT.table(PT.panel("Accounts · P&L in base currency", { wide: true, id: "ptrc-accounts" }).body, [
    { key: "account", label: "account" },
    { key: "base_currency", label: "base" },
    { key: "positions", label: "positions", numeric: true },
    { key: "open_positions", label: "open", numeric: true },
    { key: "realized_pnl_net", label: "realized (net)", numeric: true, signed: true },
    { key: "fees", label: "fees", numeric: true },
    { key: "unrealized_pnl", label: "unrealized", numeric: true, signed: true },
    { key: "total_pnl", label: "total", numeric: true, signed: true },
    { key: "day_pnl", label: "day P&L", numeric: true, signed: true },
    { key: "gross_notional", label: "gross notional", numeric: true },
    { key: "missing_rates", label: "missing rates", value: (r) => (r.missing_rates.length ? r.missing_rates.join(" ") : "") },
  ], { key: (r) => r.account, sort: { key: "account" }, empty: "no positions" });

  // -- the blotter ----------------------------------------------------------------------------
  const blotterPanel = PT.panel(`Positions · P&L in ${MONEY[money]}`, { wide: true, id: "ptrc-positions" });
  const blotterNote = PT.el("div", { class: "pt-count", id: "ptrc-blotter-note" });
  blotterPanel.body.append(blotterNote);
  // Totals first (in both currencies they fit a laptop's width), then realized and
  // unrealized: the figures a desk watches need no scrolling.
  const local = money !== "base", base = money !== "local";
  const blotter = PT.table(blotterPanel.body, [
    { key: "account", label: "account" },
    { key: "symbol", label: "symbol" },
    { key: "net_qty", label: "qty", numeric: true, signed: true },
    { key: "avg_open_price", label: "avg price", numeric: true },
    { key: "mark", label: "mark", numeric: true },
    ...(local ? [
      { key: "currency", label: "ccy" },
      { key: "total_pnl", label: "total", numeric: true, signed: true },
      { key: "day_pnl", label: "day", numeric: true, signed: true },
    ] : []),
    ...(base ? [
      { key: "base_currency", label: "base" },
      { key: "total_pnl_base", label: "total·base", numeric: true, signed: true },
      { key: "day_pnl_base", label: "day·base", numeric: true, signed: true },
    ] : []),
    ...(local ? [
      { key: "realized_pnl_net", label: "realized", numeric: true, signed: true },
      { key: "unrealized_pnl", label: "unrealized", numeric: true, signed: true },
    ] : []),
    ...(base ? [
      { key: "realized_pnl_net_base", label: "realized·base", numeric: true, signed: true },
      { key: "unrealized_pnl_base", label: "unrealized·base", numeric: true, signed: true },
    ] : []),
    { key: "fill_count", label: "fills", numeric: true },
    { key: "amended", label: "corr/bust" },
    { key: "last_fill", label: "last fill (UTC)" },
  ], { key: posKey, filter: true, sort: { key: "last_fill", desc: true }, limit: SHOWN_ROWS, empty: "no positions yet" });

  // Shown values worked out once per row, not at every sort.
  function prepare(row) {
    row.last_fill = time(row.last_fill_ts);
    row.amended = row.corrections || row.busts ? `${row.corrections}/${row.busts}` : "";
    return row;
  }

  // Without an account the blotter holds the rows updated last (a book can hold tens of
  // thousands); with one it holds that account's, from the API.
  const held = new Map(); // key -> row, oldest update first
  function keepRows(rows) {
    for (const row of rows) {
      const id = posKey(row);
      held.delete(id);
      held.set(id, row);
    }
    if (account || held.size <= KEPT_ROWS) return;
    const drop = [];
    for (const id of held.keys()) {
      if (held.size - drop.length <= KEPT_ROWS) break;
      drop.push(id);
    }
    for (const id of drop) held.delete(id);
    blotter.remove(drop);
  }

  function setBlotter(rows) {
    held.clear();
    arrived.clear();
    blotter.setRows(rows.map(prepare));
    keepRows(rows);
  }

  // A row whose position changed (a new revision) flashes; one revalued at a new mark
  // changes quietly. Rows arriving within REDRAW_MS are drawn together (redrawing a big
  // table is the costly part of the page).
  const arrived = new Map();
  let drawing = null;
  function updateBlotter(rows) {
    for (const row of rows) arrived.set(posKey(row), row);
    if (drawing === null) drawing = setTimeout(drawArrived, REDRAW_MS);
  }

  function drawArrived() {
    drawing = null;
    const rows = [...arrived.values()].map(prepare);
    arrived.clear();
    const changed = [], revalued = [];
    for (const row of rows) {
      const before = held.get(posKey(row));
      (before && before.revision === row.revision ? revalued : changed).push(row);
    }
    if (revalued.length) blotter.upsert(revalued, { flash: false });
    if (changed.length) blotter.upsert(changed);
    keepRows(rows);
  }

  PT.follow("/live/positions", (message) => {
    const items = message.items.filter(mine);
    if (message.first) {
      if (!account) setBlotter(items); // with an account, /positions?account= is the start
    } else if (items.length) {
      updateBlotter(items);
    }
    if (message.gone && message.gone.length) {
      const ids = message.gone.map((g) => JSON.stringify(g));
      for (const id of ids) { held.delete(id); arrived.delete(id); }
      blotter.remove(ids);
    }
  }, "/live/positions");

  async function loadAccountPositions() {
    if (!account) return;
    const answer = await PT.api(withAccount("/positions"));
    if (held.size) updateBlotter(answer.positions);
    else setBlotter(answer.positions);
  }

  // -- compliance alerts ---------------------------------------------------------------------
  const alerts = PT.table(PT.panel("Compliance alerts", { id: "ptrc-alerts" }).body, [
    { key: "ts", label: "time (UTC)", value: (a) => clock(a.ts) },
    { key: "severity", label: "severity" },
    { key: "rule", label: "rule" },
    { key: "account", label: "account" },
    { key: "symbol", label: "symbol" },
    { key: "observed", label: "observed", numeric: true },
    { key: "limit", label: "limit", numeric: true },
    { key: "message", label: "message" },
  ], { key: (a) => a.alert_id, filter: true, sort: { key: "ts", desc: true }, limit: 300, empty: "no alerts" });

  async function loadStoredAlerts() {
    const answer = await PT.api(withAccount("/compliance/alerts", { limit: "200" }));
    alerts.upsert(answer.alerts.filter(mine));
  }

  PT.follow("/live/alerts", (message) => {
    const items = message.items.filter(mine);
    if (items.length) alerts.upsert(items);
    if (message.missed) PT.showError({ error: "alerts missed", detail: `${message.missed} alerts came too fast to show; /compliance/alerts has them` }, "/live/alerts");
  }, "/live/alerts");

  // -- the flow over time ----------------------------------------------------------------------
  const flowPanel = PT.panel("Fills per second by outcome (last hour)", { id: "ptrc-flow" });
  const FLOW = [
    ["fills_per_s", "new fills"], ["late_per_s", "late"], ["amendments_per_s", "corrections + busts"],
    ["resends_per_s", "resends"], ["refused_per_s", "refused"], ["alerts_per_s", "alerts"],
  ];
  const flow = PT.timeChart(flowPanel.body, FLOW.map(([, label]) => ({ label })), { yLabel: "per second", height: 200 });
  const levelsPanel = PT.panel("Pending amendments and positions (last hour)", { id: "ptrc-levels" });
  const levels = PT.timeChart(levelsPanel.body, [{ label: "pending amendments" }, { label: "positions" }], { yLabel: "count", height: 200 });

  // -- corrections, busts, amendments ------------------------------------------------------------
  const amendPanel = PT.panel("Corrections, busts and amendments", { id: "ptrc-amendments" });
  const outcomes = PT.figures(amendPanel.body);
  const amendmentColumns = [
    { key: "ts", label: "time (UTC)", value: (a) => clock(a.ts) },
    { key: "exec_type", label: "type" },
    { key: "fill_id", label: "fill" },
    { key: "ref_fill_id", label: "amends" },
    { key: "account", label: "account" },
    { key: "symbol", label: "symbol" },
    { key: "side", label: "side" },
    { key: "qty", label: "qty", numeric: true },
    { key: "price", label: "price", numeric: true },
    { key: "reason", label: "reason" },
  ];
  amendPanel.body.append(PT.el("h3", { class: "pt-count" }, "pending (waiting for their original)"));
  const pending = PT.table(amendPanel.body, amendmentColumns, { key: (a) => a.fill_id, sort: { key: "ts", desc: true }, limit: 200, empty: "none pending" });
  amendPanel.body.append(PT.el("h3", { class: "pt-count" }, "refused"));
  const refused = PT.table(amendPanel.body, amendmentColumns, { key: (a) => a.fill_id, sort: { key: "ts", desc: true }, limit: 200, empty: "none refused" });

  // -- reconciliation ------------------------------------------------------------------------------
  const reconPanel = PT.panel("Reconciliation runs (click one for its breaks)", { id: "ptrc-reconciliation" });
  const runs = PT.table(reconPanel.body, [
    { key: "id", label: "run", link: (r) => r.url },
    { key: "status", label: "status" },
    { key: "requested_at", label: "requested (UTC)", value: (r) => iso(r.requested_at) },
    { key: "seconds", label: "seconds", numeric: true },
    { key: "fills_replayed", label: "replayed", numeric: true },
    { key: "live_positions", label: "live pos.", numeric: true },
    { key: "statement", label: "statement", value: (r) => (r.statement ? `${r.statement.source} (${r.statement.positions})` : "") },
    { key: "break_count", label: "breaks", numeric: true },
    { key: "error", label: "error" },
  ], { key: (r) => r.id, sort: { key: "id", desc: true }, limit: 50, empty: "no runs yet (POST /reconciliation, or `posttrade reconcile`)" });
  const breaksTitle = PT.el("h3", { class: "pt-count", id: "ptrc-breaks-title" }, "breaks: choose a run");
  reconPanel.body.append(breaksTitle);
  const breaksBox = PT.el("div", { id: "ptrc-breaks" });
  reconPanel.body.append(breaksBox);
  const breaks = PT.table(breaksBox, [
    { key: "against", label: "against" },
    { key: "account", label: "account" },
    { key: "symbol", label: "symbol" },
    { key: "field", label: "field" },
    { key: "replay", label: "replay", numeric: true },
    { key: "other", label: "other", numeric: true },
    { key: "difference", label: "difference", numeric: true, signed: true },
    { key: "value_at_mark", label: "value at mark", numeric: true, signed: true },
    { key: "missing_from", label: "missing from" },
  ], { filter: true, sort: { key: "account" }, limit: 500, empty: "no breaks" });
  let chosenRun = null;

  async function loadRun(url) {
    chosenRun = url;
    const run = await PT.api(url);
    if (chosenRun !== url) return;
    const fields = Object.entries(run.breaks_by_field).map(([f, n]) => `${f} ${n}`).join(", ");
    breaksTitle.textContent = `breaks of ${run.id} (${run.status}): ${run.break_count}${fields ? ` — ${fields}` : ""}${run.breaks_truncated ? " (truncated)" : ""}`;
    breaks.setRows(run.breaks);
  }

  reconPanel.body.addEventListener("click", (event) => {
    const link = event.target.closest("a[href^='/reconciliation/']");
    if (!link) return;
    event.preventDefault();
    loadRun(link.getAttribute("href")).then(() => PT.clearError("reconciliation run"), (exc) => PT.showError(exc.body || { error: String(exc) }, "reconciliation run"));
  });

  // -- reports -----------------------------------------------------------------------------------
  const reportsPanel = PT.panel("Reports (click to download)", { id: "ptrc-reports" });
  const reports = PT.table(reportsPanel.body, [
    { key: "date", label: "day" },
    { key: "kind", label: "kind" },
    { key: "format", label: "format" },
    { key: "name", label: "file", link: (r) => r.url },
    { key: "size", label: "size", numeric: true, value: (r) => bytes(r.size) },
    { key: "last_modified", label: "written (UTC)", value: (r) => iso(r.last_modified) },
  ], { key: (r) => r.name, filter: true, sort: { key: "date", desc: true }, limit: 200, empty: "no reports yet" });

  // A plain link cannot send the token: the file is fetched with it and saved from memory.
  reportsPanel.body.addEventListener("click", (event) => {
    const link = event.target.closest("a[href^='/reports/']");
    if (!link) return;
    event.preventDefault();
    const path = link.getAttribute("href");
    PT.download(path, path.slice("/reports/".length).replaceAll("/", "_"))
      .then(() => PT.clearError("download"), (exc) => PT.showError(exc.body || { error: String(exc) }, "download"));
  });

  // -- polling -----------------------------------------------------------------------------------
  PT.every(3000, "/positions", loadAccountPositions);
  PT.every(3000, "/pnl/summary", async () => {
    const summary = await PT.api(withAccount("/pnl/summary"));
    accounts.setRows(summary.by_account);
  });
  PT.every(5000, "/stats", async () => {
    const stats = await PT.api("/stats");
    const fills = stats.fills;
    const total = Object.values(fills).reduce((a, b) => a + b, 0);
    counts.set({
      positions: stats.positions, "fills messages": total, "symbols marked": stats.symbols_marked,
      "alerts raised": stats.alerts_raised, "dead-lettered": stats.dead_lettered, "trading day": stats.trading_day,
    });
    blotterNote.textContent = account
      ? `account ${account}: every position, revalued every 3 s and at each fill`
      : `the ${Math.min(KEPT_ROWS, stats.positions)} positions updated last of ${stats.positions}, live (choose an account for all of its)`;
    outcomes.set({
      fills: (fills.fill || 0), late: fills.late || 0, corrections: fills.correction || 0, busts: fills.bust || 0,
      openings: fills.opening || 0, resends: fills.duplicate || 0, conflicts: fills.conflict || 0,
      pending: fills.pending || 0, refused: fills.refused || 0,
    });
  });
  PT.every(5000, "/amendments", async () => {
    const answer = await PT.api(withAccount("/amendments"));
    pending.setRows(answer.pending);
    refused.setRows(answer.refused);
  });
  PT.every(2000, "/dashboard/history", async () => {
    const h = await PT.api("/dashboard/history");
    const series = (name) => h.series[name] || h.t.map(() => null);
    flow.set([h.t, ...FLOW.map(([name]) => series(name))]);
    levels.set([h.t, series("pending_amendments"), series("positions")]);
  });
  PT.every(10000, "/reconciliation", async () => {
    const answer = await PT.api("/reconciliation");
    runs.setRows(answer.runs);
    const running = chosenRun && answer.runs.find((r) => r.url === chosenRun && r.status === "running");
    if (running) await loadRun(chosenRun);
  });
  PT.every(30000, "/reports", async () => {
    const answer = await PT.api("/reports");
    reports.setRows(answer.reports);
  });
  PT.every(30000, "/compliance/alerts", loadStoredAlerts);

})();
