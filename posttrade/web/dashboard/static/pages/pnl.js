// pnl: the desk's P&L at a glance.
// * Desk figures and the account table: live from /live/accounts (every account's totals in
//   its base currency, then each account revalued since, at most twice a second).
// * Desk P&L over the last hour: /dashboard/history (sampled in the service every 2 s).
// * P&L over time per account: /pnl/history (QuestDB snapshots; from/to/interval go to the
//   API as typed, so a bad range shows the API's 400), extended live from /live/accounts
//   while `to` is empty. Without an account: the five largest |total P&L| accounts.
// * Top movers by symbol: /dashboard/movers (polled every 5 s), for the desk or the account.
// Tables and figures show decimals exactly as the API gives them (sums exactly, in BigInt);
// only the charts use floats.
"use strict";
(() => {
  const TOP_ACCOUNTS = 5; // charted when no account is chosen
  const LIVE_TAIL = 3600; // live points kept per chart (half an hour at two a second)

  // -- exact decimal sums (no float between the API's strings and the figure shown) -------
  function toScaled(text) {
    const negative = text.startsWith("-");
    const [whole, fraction = ""] = text.replace("-", "").split(".");
    const digits = BigInt(whole + fraction);
    return { digits: negative ? -digits : digits, scale: fraction.length };
  }

  function sumDecimals(values) {
    let digits = 0n;
    let scale = 0;
    for (const value of values) {
      const term = toScaled(value);
      if (term.scale > scale) {
        digits *= 10n ** BigInt(term.scale - scale);
        scale = term.scale;
      }
      digits += term.digits * 10n ** BigInt(scale - term.scale);
    }
    const negative = digits < 0n;
    let text = (negative ? -digits : digits).toString().padStart(scale + 1, "0");
    if (scale) text = `${text.slice(0, -scale)}.${text.slice(-scale)}`.replace(/\.?0+$/, "");
    return negative && text !== "0" ? `-${text}` : text;
  }

  const nsTime = (ns) => (ns ? PT.fmtTime(ns / 1e9) : "—");
  const absFloat = (value) => (value === null || value === undefined ? -1 : Math.abs(Number(value)));

  // -- the panels, in reading order ---------------------------------------------------------
  const deskFigures = PT.figures(PT.panel("Desk", { wide: true, id: "pnl-desk" }).body);

  const deskPanel = PT.panel("Desk P&L · last hour (sampled every 2 s)", { id: "pnl-desk-history" });
  const deskNote = PT.el("div", { class: "pt-count" });
  deskPanel.body.append(deskNote);
  let deskChart = null;
  let deskNames = [];

  const moversPanel = PT.panel("Top movers by symbol", { id: "pnl-movers" });
  const moversBy = PT.el("select", { id: "pnl-movers-by" },
    PT.el("option", { value: "day_pnl" }, "day P&L"), PT.el("option", { value: "total_pnl" }, "total P&L"));
  const moversScope = PT.el("span", { class: "pt-count" });
  moversPanel.body.append(PT.el("div", { class: "pt-controls" }, PT.el("label", {}, "largest |", moversBy, "|"), moversScope));
  const movers = PT.table(
    moversPanel.body,
    [
      { key: "rank", label: "#", numeric: true },
      { key: "symbol", label: "symbol" },
      { key: "currency", label: "ccy" },
      { key: "net_qty", label: "net qty", numeric: true, signed: true },
      { key: "mark", label: "mark", numeric: true },
      { key: "day_pnl", label: "day P&L", numeric: true, signed: true },
      { key: "total_pnl", label: "total P&L", numeric: true, signed: true },
    ],
    { key: (r) => r.symbol, sort: { key: "rank" }, empty: "no positions" },
  );

  const historyPanel = PT.panel("P&L over time per account · base currency (QuestDB snapshots, live tail)", { wide: true, id: "pnl-history" });
  const input = (id, placeholder, size) => PT.el("input", { id, placeholder, size, autocomplete: "off" });
  const accountInput = input("pnl-account", "top 5 accounts", 28);
  accountInput.setAttribute("list", "pnl-account-list");
  const accountList = PT.el("datalist", { id: "pnl-account-list" });
  const fromInput = input("pnl-from", "to − 1 h", 24);
  const toInput = input("pnl-to", "now", 24);
  const intervalInput = input("pnl-interval", "1m", 5);
  const showButton = PT.el("button", { id: "pnl-show", type: "submit" }, "Show");
  const form = PT.el(
    "form", { class: "pt-controls", id: "pnl-history-form" },
    PT.el("label", {}, "account ", accountInput), accountList,
    PT.el("label", {}, "from ", fromInput), PT.el("label", {}, "to ", toInput),
    PT.el("label", {}, "interval ", intervalInput), showButton,
  );
  const historyNote = PT.el("span", { class: "pt-count", id: "pnl-history-note" });
  form.append(historyNote);
  historyPanel.body.append(form);
  // Two charts side by side (the shared style has no two-column box inside a panel).
  const pair = PT.el("div", { style: "display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:12px" });
  const totalBox = PT.el("div", { id: "pnl-total-chart" }, PT.el("h2", {}, "Total P&L"));
  const dayBox = PT.el("div", { id: "pnl-day-chart" }, PT.el("h2", {}, "Day P&L"));
  pair.append(totalBox, dayBox);
  historyPanel.body.append(pair);

  const accountsPanel = PT.panel("Accounts · base currency (live)", { wide: true, id: "pnl-accounts" });
  const accountsTable = PT.table(
    accountsPanel.body,
    [
      { key: "account", label: "account", link: (r) => `#account=${encodeURIComponent(r.account)}` },
      { key: "base_currency", label: "ccy" },
      { key: "positions", label: "positions", numeric: true },
      { key: "open_positions", label: "open", numeric: true },
      { key: "total_pnl", label: "total P&L", numeric: true, signed: true },
      { key: "day_pnl", label: "day P&L", numeric: true, signed: true },
      { key: "realized_pnl_net", label: "realized net", numeric: true, signed: true },
      { key: "unrealized_pnl", label: "unrealized", numeric: true, signed: true },
      { key: "fees", label: "fees", numeric: true },
      { key: "gross_notional", label: "gross notional", numeric: true },
      { key: "missing_rates", label: "missing rates", value: (r) => (r.missing_rates || []).join(" ") || null },
      { key: "as_of", label: "as of", value: (r) => nsTime(r.as_of) },
    ],
    { key: (r) => r.account, filter: true, sort: { key: "total_pnl", desc: true }, limit: 200 },
  );

  // -- the accounts, live -------------------------------------------------------------------
  const accounts = new Map(); // account -> its totals as the API gives them
  let deskPending = false;

  function renderDesk() {
    deskPending = false;
    const byBase = new Map();
    let positions = 0, open = 0, newest = 0;
    for (const a of accounts.values()) {
      positions += a.positions;
      open += a.open_positions;
      if (a.as_of > newest) newest = a.as_of;
      const base = byBase.get(a.base_currency) || { total: [], day: [], unknown: 0 };
      if (a.total_pnl === null) base.unknown += 1;
      else base.total.push(a.total_pnl);
      if (a.day_pnl !== null) base.day.push(a.day_pnl);
      byBase.set(a.base_currency, base);
    }
    const figures = { accounts: accounts.size, positions, "open positions": open };
    for (const [ccy, base] of [...byBase].sort()) {
      figures[`total P&L ${ccy}`] = sumDecimals(base.total);
      figures[`day P&L ${ccy}`] = sumDecimals(base.day);
      if (base.unknown) figures[`${ccy} accounts without a total`] = base.unknown;
    }
    figures["revaluations/s"] = lastRevaluations;
    figures["as of"] = nsTime(newest);
    deskFigures.set(figures);
  }

  function scheduleDesk() {
    if (deskPending) return;
    deskPending = true;
    requestAnimationFrame(renderDesk);
  }

  let listed = 0;
  PT.follow("/live/accounts", (message) => {
    if (message.first) accounts.clear();
    for (const row of message.items) accounts.set(row.account, row);
    for (const name of message.gone || []) accounts.delete(name);
    if (message.first) accountsTable.setRows(message.items);
    else if (message.items.length) accountsTable.upsert(message.items);
    if (message.gone && message.gone.length) accountsTable.remove(message.gone.map((account) => ({ account })));
    if (message.first || message.items.length) scheduleDesk();
    if (accounts.size !== listed) {
      listed = accounts.size;
      accountList.replaceChildren(...[...accounts.keys()].sort().map((name) => PT.el("option", { value: name })));
    }
    if (message.first && !charted.length) loadHistory().catch(() => {});
    else liveTail(message.items);
  }, "/live/accounts");

  // -- desk P&L over the last hour (the service's ring) ---------------------------------------
  let lastRevaluations = null;
  PT.every(4000, "/dashboard/history", async () => {
    const history = await PT.api("/dashboard/history");
    const names = Object.keys(history.series).filter((n) => /^(total|day)_pnl\./.test(n)).sort();
    if (!deskChart || deskNames.join() !== names.join()) {
      deskChart?.plot.destroy();
      deskPanel.body.querySelector(".pt-chart")?.remove();
      const label = (n) => `${n.split(".")[1]} ${n.startsWith("total") ? "total" : "day"}`;
      deskChart = PT.timeChart(deskPanel.body, names.map((n) => ({ label: label(n) })), { yLabel: "P&L" });
      deskNames = names;
    }
    deskChart.set([history.t, ...names.map((n) => history.series[n])]);
    const rates = history.series.revaluations_per_s || [];
    lastRevaluations = rates.length ? rates[rates.length - 1] : null;
    const unknown = Object.entries(history.series)
      .filter(([n]) => n.startsWith("unknown_total."))
      .map(([n, v]) => `${v[v.length - 1]} ${n.split(".")[1]}`);
    deskNote.textContent = "each line sums the accounts whose figure is known (an unmarked position leaves its " +
      `account without one)${unknown.length ? `; accounts without a total now: ${unknown.join(", ")}` : ""}`;
    scheduleDesk();
  });

  // -- P&L over time per account ---------------------------------------------------------------
  let charted = []; // the accounts drawn
  let historyData = null; // {t: [...], total: {account: [...]}, day: {account: [...]}}
  let tail = { t: [], total: {}, day: {} }; // live points after the history
  let charts = null;
  let redrawPending = false;

  function chosenAccounts() {
    const chosen = accountInput.value;
    if (chosen !== "") return [chosen];
    return [...accounts.values()]
      .filter((a) => a.total_pnl !== null)
      .sort((a, b) => absFloat(b.total_pnl) - absFloat(a.total_pnl))
      .slice(0, TOP_ACCOUNTS)
      .map((a) => a.account);
  }

  function historyPath(account) {
    const params = new URLSearchParams({ account });
    for (const [name, field] of [["from", fromInput], ["to", toInput], ["interval", intervalInput]]) {
      if (field.value !== "") params.set(name, field.value);
    }
    return `/pnl/history?${params}`;
  }

  async function loadHistory() {
    try {
      await readHistory();
      PT.clearError("/pnl/history");
    } catch (exc) {
      PT.showError(exc.body || { error: "page error", detail: String(exc) }, "/pnl/history");
      throw exc;
    }
  }

  async function readHistory() {
    const wanted = chosenAccounts();
    if (!wanted.length) return;
    const answers = await Promise.all(wanted.map((account) => PT.api(historyPath(account))));
    // One x for every account: the union of the buckets, each account's last value carried
    // forward (P&L is a level: it holds until the next snapshot).
    const points = new Map(); // t -> {account: point}
    for (const [i, answer] of answers.entries()) {
      for (const series of answer.series) {
        for (const point of series.points) {
          const t = Date.parse(point.ts) / 1000;
          if (!points.has(t)) points.set(t, {});
          points.get(t)[wanted[i]] = point;
        }
      }
    }
    const t = [...points.keys()].sort((a, b) => a - b);
    const data = { t, total: {}, day: {} };
    for (const account of wanted) {
      let last = null;
      data.total[account] = [];
      data.day[account] = [];
      for (const x of t) {
        last = points.get(x)[account] || last;
        data.total[account].push(last ? PT.number(last.total_pnl) : null);
        data.day[account].push(last ? PT.number(last.day_pnl) : null);
      }
    }
    const first = answers[0];
    const bases = new Set(wanted.map((a) => accounts.get(a)?.base_currency).filter(Boolean));
    const unit = bases.size === 1 ? [...bases][0] : "base currency";
    if (!charts || charted.join("\n") !== wanted.join("\n") || charts.unit !== unit) {
      charts?.total.plot.destroy();
      charts?.day.plot.destroy();
      totalBox.querySelector(".pt-chart")?.remove();
      dayBox.querySelector(".pt-chart")?.remove();
      const series = wanted.map((label) => ({ label }));
      charts = { unit, total: PT.timeChart(totalBox, series, { yLabel: unit }), day: PT.timeChart(dayBox, series, { yLabel: unit }) };
      charted = wanted;
      tail = { t: [], total: {}, day: {} };
    }
    historyData = data;
    const lastT = t.length ? t[t.length - 1] : 0;
    trimTail((x) => x > lastT);
    const snapshots = answers.reduce((n, a) => n + a.series.reduce((m, s) => m + s.points.length, 0), 0);
    historyNote.textContent = `${first.from} → ${first.to} by ${first.interval}: ${snapshots} points` +
      `${answers.some((a) => a.truncated) ? " (truncated)" : ""}${toInput.value === "" ? ", live after" : ""}`;
    redraw();
  }

  function trimTail(keep) {
    const indices = tail.t.map((x, i) => (keep(x, i) ? i : -1)).filter((i) => i >= 0);
    const pick = (list) => indices.map((i) => list[i]);
    tail = {
      t: pick(tail.t),
      total: Object.fromEntries(Object.entries(tail.total).map(([a, v]) => [a, pick(v)])),
      day: Object.fromEntries(Object.entries(tail.day).map(([a, v]) => [a, pick(v)])),
    };
  }

  // While `to` is "now", each live line that moves a charted account adds a point (every
  // charted account's current value, so the accounts share one x).
  function liveTail(items) {
    if (!charts || toInput.value !== "" || !items.some((row) => charted.includes(row.account))) return;
    tail.t.push(Date.now() / 1000);
    for (const account of charted) {
      const row = accounts.get(account);
      (tail.total[account] ||= []).push(row ? PT.number(row.total_pnl) : null);
      (tail.day[account] ||= []).push(row ? PT.number(row.day_pnl) : null);
    }
    if (tail.t.length > LIVE_TAIL) trimTail((x, i) => i >= tail.t.length - LIVE_TAIL);
    redraw();
  }

  function redraw() {
    if (redrawPending) return;
    redrawPending = true;
    requestAnimationFrame(() => {
      redrawPending = false;
      if (!charts || !historyData) return;
      const t = [...historyData.t, ...tail.t];
      const column = (figure, account) => [...historyData[figure][account], ...(tail[figure][account] || tail.t.map(() => null))];
      charts.total.set([t, ...charted.map((a) => column("total", a))]);
      charts.day.set([t, ...charted.map((a) => column("day", a))]);
    });
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    loadHistory().catch(() => {});
    loadMovers().catch(() => {});
  });
  // QuestDB's buckets are re-read every 30 s; the live tail fills in between.
  setInterval(() => { if (!document.hidden && charts) loadHistory().catch(() => {}); }, 30000);

  // -- top movers ---------------------------------------------------------------------------
  async function readMovers() {
    const params = new URLSearchParams({ by: moversBy.value, limit: "15" });
    if (accountInput.value !== "") params.set("account", accountInput.value);
    const answer = await PT.api(`/dashboard/movers?${params}`);
    movers.setRows(answer.movers.map((row, i) => ({ rank: i + 1, ...row })));
    moversScope.textContent = `${answer.account ? `account ${answer.account}` : "whole desk"}: ${answer.symbols} symbols, ` +
      `summed in each symbol's currency at ${PT.fmtTime(answer.taken_at)}`;
  }

  async function loadMovers() {
    try {
      await readMovers();
      PT.clearError("/dashboard/movers");
    } catch (exc) {
      PT.showError(exc.body || { error: "page error", detail: String(exc) }, "/dashboard/movers");
      throw exc;
    }
  }

  PT.every(5000, "/dashboard/movers", readMovers);
  moversBy.addEventListener("change", () => loadMovers().catch(() => {}));

  // A click on an account in the table (#account=...) charts it and its movers.
  function followHash() {
    const match = /^#account=(.*)$/.exec(location.hash);
    if (!match) return;
    accountInput.value = decodeURIComponent(match[1]);
    loadHistory().catch(() => {});
    loadMovers().catch(() => {});
  }
  window.addEventListener("hashchange", followHash);
  if (location.hash) followHash();
})();
