// What every posttrade page shares: the navigation bar, the token, reading the API,
// following a live stream, sortable and filterable tables, charts, and errors shown to
// the user. A page's own script (pages/<service>.js) builds its panels with these.
//
// Numbers: the API gives exact decimals as strings ("1234.5"); tables show them as given
// (never through a float) and sort them exactly (`compareDecimals`). Charts draw floats:
// a chart is a picture, the table beside it is the number.
"use strict";

const PT = (() => {
  const config = JSON.parse(document.getElementById("pt-config").textContent);
  const TOKEN_KEY = "posttrade-token";

  // -- the token ----------------------------------------------------------------------
  // Kept for this tab and this service's origin only (sessionStorage): it never goes in
  // a URL and is gone when the tab closes.
  const token = () => sessionStorage.getItem(TOKEN_KEY);
  const headers = () => (token() ? { Authorization: `Bearer ${token()}` } : {});
  // Without the token a protected service answers every read with 401: ask first, read after.
  const waiting = () => config.auth && !token();

  // -- the navigation bar ---------------------------------------------------------------
  function href(link) {
    return link.startsWith(":") ? `${location.protocol}//${location.hostname}${link}/` : link;
  }

  function nav() {
    const bar = document.getElementById("pt-nav");
    const brand = el("span", { class: "pt-brand" }, "posttrade");
    const links = el("div", { class: "pt-links" });
    for (const [service, link] of Object.entries(config.links)) {
      const a = el("a", { href: href(link), "data-service": service }, config.titles[service] || service);
      if (service === config.service) a.classList.add("pt-here");
      links.append(a);
    }
    const status = el("span", { id: "pt-live", class: "pt-live", title: "live updates" });
    const auth = el("form", { id: "pt-token-form", class: "pt-token", hidden: "" });
    const input = el("input", { id: "pt-token", type: "password", placeholder: "bearer token", autocomplete: "off" });
    auth.append(input, el("button", { type: "submit" }, "Use token"));
    auth.addEventListener("submit", (event) => {
      event.preventDefault();
      if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      location.reload();
    });
    const signOut = el("button", { id: "pt-sign-out", class: "pt-link-button", hidden: "" }, "forget token");
    signOut.addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
    if (token()) signOut.hidden = false;
    bar.append(brand, links, status, auth, signOut);
    if (config.auth && !token()) askForToken("this service needs a token to show account data");
  }

  function askForToken(why) {
    const form = document.getElementById("pt-token-form");
    form.hidden = false;
    form.title = why;
    showError({ error: "unauthorized", detail: why });
  }

  // -- errors -------------------------------------------------------------------------
  const errors = new Map(); // where -> message: one line per failing source, cleared when it recovers

  function showError(body, where = "page") {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    errors.set(where, `${body.error}${detail ? ": " + detail : ""}`);
    renderErrors();
  }

  function clearError(where) {
    if (errors.delete(where)) renderErrors();
  }

  function renderErrors() {
    const box = document.getElementById("pt-error");
    box.replaceChildren(...[...errors].map(([where, text]) => el("div", {}, `${where}: ${text}`)));
    box.hidden = errors.size === 0;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(`${status} ${body.error}`);
      this.status = status;
      this.body = body;
    }
  }

  // -- reading the API ------------------------------------------------------------------
  // The JSON answer, or an ApiError carrying the service's JSON error (a 4xx says what
  // was wrong with the request; the page shows it as it is).
  async function api(path, { method = "GET", body } = {}) {
    if (waiting()) throw new ApiError(401, { error: "unauthorized", detail: "enter the token first" });
    const init = { method, headers: headers() };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (exc) {
      throw new ApiError(0, { error: "service unreachable", detail: String(exc) });
    }
    const type = response.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await response.json() : await response.text();
    if (response.status === 401) askForToken("the token is missing or wrong");
    if (!response.ok) throw new ApiError(response.status, typeof data === "object" ? data : { error: response.statusText, detail: data });
    return data;
  }

  // Saves the file at `path` as `filename`: fetched with the token (a plain link cannot
  // send it), then handed to the browser through an object URL. Throws ApiError like `api`.
  async function download(path, filename) {
    if (waiting()) throw new ApiError(401, { error: "unauthorized", detail: "enter the token first" });
    let response;
    try {
      response = await fetch(path, { headers: headers() });
    } catch (exc) {
      throw new ApiError(0, { error: "service unreachable", detail: String(exc) });
    }
    if (response.status === 401) askForToken("the token is missing or wrong");
    if (!response.ok) {
      const body = await response.json().catch(() => ({ error: response.statusText }));
      throw new ApiError(response.status, body);
    }
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: filename || path.split("/").pop(), hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // `fn` now and every `ms` while the tab is visible; its failure is shown under `where`
  // and cleared by its next success.
  function every(ms, where, fn) {
    if (waiting()) return;
    let timer = null;
    const run = async () => {
      timer = null;
      try {
        await fn();
        clearError(where);
      } catch (exc) {
        showError(exc.body || { error: "page error", detail: String(exc) }, where);
      }
      if (!document.hidden) timer = setTimeout(run, ms);
    };
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && timer === null) run();
    });
    run();
  }

  // -- following a live stream ----------------------------------------------------------
  // A streamed fetch of NDJSON (web/live.py): `onLine(message)` for each line; the first
  // is the starting state. Reconnects with a growing pause; each reconnect starts again
  // from the state the server sends first, so nothing is missed across a gap.
  const streams = new Set();

  function setLiveStatus() {
    const status = document.getElementById("pt-live");
    if (!status) return;
    const states = [...streams].map((s) => s.state);
    const live = states.length > 0 && states.every((s) => s === "live");
    status.textContent = live ? "● live" : states.length ? "○ reconnecting" : "";
    status.classList.toggle("pt-on", live);
  }

  function follow(path, onLine, where = path) {
    if (waiting()) return;
    const stream = { state: "connecting" };
    streams.add(stream);
    let pause = 500;
    const decoder = new TextDecoder();
    const connect = async () => {
      try {
        const response = await fetch(path, { headers: headers(), cache: "no-store" });
        if (response.status === 401) askForToken("the token is missing or wrong");
        if (!response.ok) {
          const body = await response.json().catch(() => ({ error: response.statusText }));
          throw new ApiError(response.status, body);
        }
        const reader = response.body.getReader();
        let buffer = "";
        let first = true;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let end;
          while ((end = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, end);
            buffer = buffer.slice(end + 1);
            if (!line) continue;
            const message = JSON.parse(line);
            if (first) {
              message.first = true;
              first = false;
              stream.state = "live";
              pause = 500;
              clearError(where);
              setLiveStatus();
            }
            onLine(message);
          }
        }
        throw new ApiError(0, { error: "live stream ended", detail: "reconnecting" });
      } catch (exc) {
        stream.state = "reconnecting";
        setLiveStatus();
        showError(exc.body || { error: "live stream failed", detail: String(exc) }, where);
        if (exc.status === 401 || exc.status === 403) return;
        setTimeout(connect, pause);
        pause = Math.min(pause * 2, 10000);
      }
    };
    connect();
  }

  // -- building the page ----------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === false || value === null || value === undefined) continue;
      node.setAttribute(name, value === true ? "" : value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  // A titled panel in the page's grid; `wide` spans the whole row.
  function panel(title, { id, wide = false } = {}) {
    const body = el("div", { class: "pt-panel-body" });
    const head = el("h2", {}, title);
    const section = el("section", { class: wide ? "pt-panel pt-wide" : "pt-panel", id }, head, body);
    document.getElementById("pt-main").append(section);
    return { section, head, body };
  }

  // A row of "label: value" figures (counts, rates); `set({label: value})`.
  function figures(parent) {
    const box = el("dl", { class: "pt-figures" });
    parent.append(box);
    return {
      set(values) {
        box.replaceChildren(
          ...Object.entries(values).flatMap(([label, value]) => [
            el("div", {}, el("dt", {}, label), el("dd", { class: signClass(value) }, value === null || value === undefined ? "—" : String(value))),
          ]),
        );
      },
    };
  }

  // -- exact decimals ---------------------------------------------------------------------
  function isDecimal(value) {
    return typeof value === "string" && /^-?\d+(\.\d+)?$/.test(value);
  }

  // Compares two decimal strings exactly (no float in between).
  function compareDecimals(a, b) {
    const neg = (s) => s.startsWith("-");
    if (neg(a) !== neg(b)) return neg(a) ? -1 : 1;
    const sign = neg(a) ? -1 : 1;
    const [ai, af = ""] = a.replace("-", "").split(".");
    const [bi, bf = ""] = b.replace("-", "").split(".");
    const ia = ai.replace(/^0+(?=\d)/, ""), ib = bi.replace(/^0+(?=\d)/, "");
    if (ia.length !== ib.length) return sign * (ia.length - ib.length);
    if (ia !== ib) return sign * (ia < ib ? -1 : 1);
    const width = Math.max(af.length, bf.length);
    const fa = af.padEnd(width, "0"), fb = bf.padEnd(width, "0");
    return fa === fb ? 0 : sign * (fa < fb ? -1 : 1);
  }

  function compareValues(a, b) {
    if (a === b) return 0;
    if (a === null || a === undefined) return 1;
    if (b === null || b === undefined) return -1;
    if (isDecimal(a) && isDecimal(b)) return compareDecimals(a, b);
    if (typeof a === "number" && typeof b === "number") return a - b;
    return String(a).localeCompare(String(b));
  }

  function signClass(value, cost = false) {
    if (cost) return { "pt-pos": "pt-neg", "pt-neg": "pt-pos" }[signClass(value)] || "";
    if (typeof value === "number") return value < 0 ? "pt-neg" : value > 0 ? "pt-pos" : "";
    if (isDecimal(value)) return value.startsWith("-") ? "pt-neg" : /[1-9]/.test(value) ? "pt-pos" : "";
    return "";
  }

  // -- tables -------------------------------------------------------------------------------
  // columns: [{key, label, numeric?: true (right-aligned, exact), signed?: true (green/red;
  //            "cost": a cost, red when positive),
  //            value?: row => shown value, link?: row => href}]
  // options: {key: row => id, filter: true (a text box filtering every column),
  //           sort: {key, desc}, limit: rows shown (the rest are counted), empty: text}
  // Returns {setRows(rows), upsert(rows, {flash}), remove(ids), rows()}; rows changed by
  // upsert flash briefly (unless flash: false, e.g. a value moving with the market).
  // Rendering is batched to one per animation frame.
  function table(parent, columns, options = {}) {
    const rowKey = options.key || ((row) => JSON.stringify(row));
    const data = new Map();
    const changed = new Set();
    let sort = options.sort || null;
    let filterText = "";
    const wrap = el("div", { class: "pt-table-wrap" });
    const filter = options.filter ? el("input", { class: "pt-filter", type: "search", placeholder: "filter…" }) : null;
    const count = el("span", { class: "pt-count" });
    const tableEl = el("table", { class: "pt-table" });
    const thead = el("thead");
    const tbody = el("tbody");
    const headRow = el("tr");
    for (const column of columns) {
      const th = el("th", { class: column.numeric ? "pt-num" : "", "data-key": column.key }, column.label);
      th.addEventListener("click", () => {
        sort = sort && sort.key === column.key ? { key: column.key, desc: !sort.desc } : { key: column.key, desc: !!column.numeric };
        schedule();
      });
      headRow.append(th);
    }
    thead.append(headRow);
    tableEl.append(thead, tbody);
    const tools = el("div", { class: "pt-table-tools" }, filter, count);
    wrap.append(tools, tableEl);
    parent.append(wrap);
    if (filter) filter.addEventListener("input", () => { filterText = filter.value.trim().toLowerCase(); schedule(); });

    const shown = (column, row) => (column.value ? column.value(row) : row[column.key]);
    let pending = false;
    function schedule() {
      if (pending) return;
      pending = true;
      requestAnimationFrame(render);
    }
    function render() {
      pending = false;
      let rows = [...data.entries()];
      if (filterText) {
        rows = rows.filter(([, row]) => columns.some((c) => String(shown(c, row) ?? "").toLowerCase().includes(filterText)));
      }
      if (sort) {
        const column = columns.find((c) => c.key === sort.key);
        // Unknown values (null, "—") go last whichever way the column is sorted.
        const unknown = (v) => v === null || v === undefined;
        rows.sort(([, a], [, b]) => {
          const x = shown(column, a), y = shown(column, b);
          if (unknown(x) || unknown(y)) return unknown(x) - unknown(y);
          return (sort.desc ? -1 : 1) * compareValues(x, y);
        });
      }
      const limit = options.limit || 1000;
      const total = rows.length;
      rows = rows.slice(0, limit);
      tbody.replaceChildren(
        ...(rows.length
          ? rows.map(([id, row]) => {
              const tr = el("tr", { "data-id": id, class: changed.has(id) ? "pt-flash" : "" });
              for (const column of columns) {
                const value = shown(column, row);
                const text = value === null || value === undefined ? "—" : String(value);
                const cls = [column.numeric ? "pt-num" : "", column.signed ? signClass(value, column.signed === "cost") : ""].join(" ").trim();
                const href = column.link && column.link(row);
                tr.append(el("td", { class: cls }, href ? el("a", { href }, text) : text));
              }
              return tr;
            })
          : [el("tr", {}, el("td", { colspan: columns.length, class: "pt-empty" }, options.empty || "nothing yet"))]),
      );
      for (const th of headRow.children) {
        th.classList.toggle("pt-sorted", !!sort && th.dataset.key === sort.key);
        th.classList.toggle("pt-desc", !!sort && th.dataset.key === sort.key && !!sort.desc);
      }
      count.textContent = total > limit ? `${limit} of ${total} rows` : `${total} rows`;
      changed.clear();
    }
    return {
      setRows(rows) {
        data.clear();
        for (const row of rows) data.set(rowKey(row), row);
        schedule();
      },
      upsert(rows, { flash = true } = {}) {
        for (const row of rows) {
          const id = rowKey(row);
          data.set(id, row);
          if (flash) changed.add(id);
        }
        schedule();
      },
      remove(ids) {
        for (const id of ids) data.delete(typeof id === "string" ? id : rowKey(id));
        schedule();
      },
      rows: () => [...data.values()],
    };
  }

  // -- charts -------------------------------------------------------------------------------
  const PALETTE = ["#4ea1ff", "#f5a623", "#50e3c2", "#e86a92", "#b8e986", "#bd10e0", "#9b9b9b", "#ffd166"];
  const GRID = { stroke: "#aab", grid: { stroke: "#2a2f3a" } };

  // A uPlot in a box of its own under `parent`, sized to it and redrawn on resize.
  // `set(data)` draws and records the number of points (`data-points`: the tests read it).
  function chart(parent, height, options) {
    const box = el("div", { class: "pt-chart" });
    parent.append(box);
    const width = () => Math.max(300, box.clientWidth || parent.clientWidth || 600);
    const empty = options.series.map(() => []);
    const plot = new uPlot({ width: width(), height, legend: { live: true }, ...options }, empty, box);
    new ResizeObserver(() => plot.setSize({ width: width(), height })).observe(box);
    return {
      plot,
      set(data) {
        plot.setData(data);
        box.dataset.points = String(data[0].length);
      },
    };
  }

  function line(s, i, extra = {}) {
    return { label: s.label, stroke: s.stroke || PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false, ...extra };
  }

  // A time series: `series` is [{label, stroke?}], data [[t (s)], [y...], ...].
  function timeChart(parent, series, { height = 220, yLabel = "" } = {}) {
    return chart(parent, height, {
      series: [{}, ...series.map((s, i) => line(s, i))],
      axes: [GRID, { ...GRID, label: yLabel, size: 70 }],
    });
  }

  // Lines over an x that is not time (a distribution's bins, a few horizons): `series`
  // [{label, stroke?}], data [[x...], [y...], ...]. `ticks` {x: label} puts labels on
  // those x values only (categories such as {0: "+1 s"}); `stepped` draws each y flat
  // from its x to the next (histograms that overlay); `points` marks every point.
  function xyChart(parent, series, { height = 220, xLabel = "", yLabel = "", ticks = null, stepped = false, points = false } = {}) {
    const xAxis = { ...GRID, label: xLabel };
    if (ticks) {
      xAxis.splits = () => Object.keys(ticks).map(Number);
      xAxis.values = (u, splits) => splits.map((v) => ticks[v] ?? "");
    }
    return chart(parent, height, {
      series: [
        { label: xLabel || "x" },
        ...series.map((s, i) => {
          const stroke = s.stroke || PALETTE[i % PALETTE.length];
          const steps = stepped ? { paths: uPlot.paths.stepped({ align: 1 }), fill: stroke + "1c" } : {};
          return line(s, i, { points: { show: points, size: 6 }, ...steps });
        }),
      ],
      axes: [xAxis, { ...GRID, label: yLabel, size: 70 }],
      scales: { x: { time: false } },
    });
  }

  function number(value) {
    return value === null || value === undefined || value === "" ? null : Number(value);
  }

  function fmtTime(epochSeconds) {
    return epochSeconds ? new Date(epochSeconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "—";
  }

  document.title = `${config.title} · posttrade`;
  nav();
  return {
    config, api, download, every, follow, el, panel, figures, table, timeChart, xyChart, showError, clearError,
    compareDecimals, number, fmtTime, ApiError,
  };
})();
