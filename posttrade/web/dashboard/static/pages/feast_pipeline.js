// feast_pipeline: are the features fresh? Every view's freshness, rows, last push and
// materialization and errors (/features/status), freshness and rows/s per view over the
// last hour (/dashboard/history), and one symbol's or account's online feature values as
// a model reads them (/features/online).
"use strict";
(() => {
  const POLL_MS = 2000;
  const seconds = (s) => (s === null || s === undefined ? null : `${s} s`);
  const shortTime = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : null);

  // -- /features/status --------------------------------------------------------------------------
  const pipelinePanel = PT.panel("Pipeline", { wide: true });
  const pipeline = PT.figures(pipelinePanel.body);
  // Figures colour any positive count green; a count of errors is bad news: red, or plain at 0.
  function redErrors(body) {
    for (const figure of body.querySelectorAll(".pt-figures > div")) {
      if (!/error/.test(figure.querySelector("dt").textContent)) continue;
      const dd = figure.querySelector("dd");
      dd.className = Number(dd.textContent) > 0 ? "pt-neg" : "";
    }
  }

  const views = PT.table(
    PT.panel("Feature views", { wide: true }).body,
    [
      { key: "view", label: "view" },
      { key: "kind", label: "kind" },
      { key: "freshness_s", label: "freshness s", numeric: true },
      { key: "newest_event_time", label: "newest event", value: (v) => shortTime(v.newest_event_time) },
      { key: "rows_pushed", label: "rows pushed", numeric: true },
      { key: "entities_written_online", label: "entities online", numeric: true },
      { key: "last_push", label: "last push", value: (v) => shortTime(v.last_push) },
      {
        key: "last_materialization", label: "materialized",
        value: (v) => (v.last_materialization ? `to ${shortTime(v.last_materialization.end)} (${v.last_materialization.duration_s ?? "?"} s)` : null),
      },
      { key: "materializations", label: "materializations", numeric: true },
      // `errors` = push errors + materialization errors.
      { key: "errors", label: "errors", numeric: true },
      { key: "last_error", label: "last error", value: (v) => (v.last_error ? `${shortTime(v.last_error_at)} ${v.last_error}` : null) },
    ],
    { key: (v) => v.view, sort: { key: "view" } },
  );

  PT.every(POLL_MS, "/features/status", async () => {
    const s = await PT.api("/features/status");
    const sum = (key) => s.views.reduce((total, v) => total + (v[key] || 0), 0);
    const freshest = s.views.map((v) => v.freshness_s).filter((f) => f !== null);
    const last = s.batch.last_run;
    pipeline.set({
      views: s.views.length,
      "rows pushed": sum("rows_pushed"),
      "freshest view": seconds(freshest.length ? Math.min(...freshest) : null),
      "stalest view": seconds(freshest.length ? Math.max(...freshest) : null),
      "push errors": sum("push_errors"),
      materializations: sum("materializations"),
      "materialization errors": sum("materialization_errors"),
      "late trade minutes": s.late_events.trade_minutes,
      "late quote minutes": s.late_events.quote_minutes,
      "batch runs": s.batch.runs,
      "batch errors": s.batch.errors,
      "last batch": last ? `${shortTime(last.finished_at)}: ${last.rows} rows, ${last.hours_computed} h in ${last.duration_s} s` : "none yet",
      "online store": `${s.online_store} (${String(s.online_writer).split(" ")[0]})`,
    });
    redErrors(pipelinePanel.body);
    views.setRows(s.views);
    if (s.batch.last_error) PT.showError({ error: "last batch failed", detail: s.batch.last_error }, "batch");
    else PT.clearError("batch");
  });

  // -- over time: /dashboard/history -------------------------------------------------------------------
  const charts = [
    { title: "Freshness over time", unit: "seconds", prefix: "freshness." },
    { title: "Rows pushed per second", unit: "rows/s", prefix: "rows_per_s." },
  ].map((c) => ({ ...c, panel: PT.panel(c.title), chart: null, names: [] }));

  PT.every(POLL_MS, "/dashboard/history", async () => {
    const history = await PT.api("/dashboard/history");
    for (const c of charts) {
      const names = Object.keys(history.series).filter((n) => n.startsWith(c.prefix)).sort();
      if (!c.chart || c.names.join() !== names.join()) {
        c.panel.body.replaceChildren();
        c.chart = PT.timeChart(c.panel.body, names.map((n) => ({ label: n.slice(c.prefix.length) })), { yLabel: c.unit, height: 220 });
        c.panel.body.querySelector(".pt-chart").dataset.chart = c.prefix.slice(0, -1);
        c.names = names;
      }
      c.chart.set([history.t, ...names.map((n) => history.series[n])]);
    }
  });

  // -- online values: /features/online -------------------------------------------------------------------
  const online = PT.panel("Online feature values", { wide: true, id: "pt-online" });
  const kindSelect = PT.el("select", { id: "pt-entity-kind" }, PT.el("option", { value: "symbol" }, "symbol"), PT.el("option", { value: "account" }, "account"));
  const nameList = PT.el("datalist", { id: "pt-entity-names" });
  const nameInput = PT.el("input", { id: "pt-entity", list: "pt-entity-names", placeholder: "symbol", size: 32, autocomplete: "off" });
  const featuresInput = PT.el("input", { id: "pt-features", placeholder: "features: all (or view:feature,…)", size: 44, autocomplete: "off" });
  const info = PT.el("span", { id: "pt-online-info", class: "pt-count" });
  const controls = PT.el(
    "form",
    { class: "pt-controls", novalidate: true },
    kindSelect, nameInput, nameList, featuresInput, PT.el("button", { id: "pt-show-features", type: "submit" }, "Show"), info,
  );
  online.body.append(controls);

  // The values as the API gives them (Feast's float features: shown, never rounded here).
  const values = PT.table(
    online.body,
    [
      { key: "view", label: "view" },
      { key: "feature", label: "feature" },
      { key: "value", label: "value", numeric: true },
    ],
    { key: (r) => r.ref, sort: { key: "view" }, empty: "pick a symbol or an account" },
  );

  let entities = { symbols: [], accounts: [], features: {} };
  let selection = null; // {kind, name, features}

  function fillNames() {
    const names = kindSelect.value === "symbol" ? entities.symbols : entities.accounts;
    nameList.replaceChildren(...names.map((n) => PT.el("option", { value: n })));
    nameInput.placeholder = kindSelect.value;
    featuresInput.title = `${kindSelect.value} features: ${(entities.features[kindSelect.value] || []).join(", ")}`;
  }
  kindSelect.addEventListener("change", fillNames);

  const onlinePath = (s) => {
    const query = new URLSearchParams({ [s.kind]: s.name });
    if (s.features) query.set("features", s.features);
    return `/features/online?${query}`;
  };

  async function loadValues() {
    if (!selection) return;
    const asked = selection;
    try {
      const answer = await PT.api(onlinePath(asked));
      if (asked !== selection) return;
      values.setRows(
        Object.entries(answer.features).map(([ref, value]) => {
          const [view, feature] = ref.includes(":") ? ref.split(":") : ["", ref];
          return { ref, view, feature, value: value === null ? null : String(value) };
        }),
      );
      const known = Object.values(answer.features).filter((v) => v !== null).length;
      info.textContent = `${answer.entity} ${answer[answer.entity]}: ${known} of ${Object.keys(answer.features).length} features known, read in ${answer.read_ms} ms`;
    } catch (exc) {
      // A 4xx is about the request: show none rather than the previous entity's values.
      if (asked === selection && exc.status >= 400 && exc.status < 500) {
        values.setRows([]);
        info.textContent = "";
      }
      throw exc;
    }
  }

  async function showNow() {
    try {
      await loadValues();
      PT.clearError("online values");
    } catch (exc) {
      PT.showError(exc.body || { error: "page error", detail: String(exc) }, "online values");
    }
  }

  controls.addEventListener("submit", (event) => {
    event.preventDefault();
    // As typed: the service says what is wrong (its 400), the page does not guess.
    selection = { kind: kindSelect.value, name: nameInput.value, features: featuresInput.value };
    showNow();
  });

  let firstPick = true;
  PT.every(30000, "/dashboard/entities", async () => {
    entities = await PT.api("/dashboard/entities");
    fillNames();
    if (firstPick && entities.symbols.length && !nameInput.value) {
      firstPick = false;
      nameInput.value = entities.symbols[0];
      selection = { kind: "symbol", name: entities.symbols[0], features: "" };
      showNow();
    }
  });

  // The values follow the pipeline: the selection read again every POLL_MS.
  PT.every(POLL_MS, "online values", loadValues);
})();
