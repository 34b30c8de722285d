"""The gate's run: find (or start) the stack and the six services, run the four tests
in order, stop what it started, and hand back the report.

Order, and why:
1. integration, first look: /health of every service, and where each log ends;
2. market data and an order/fill published early (bars, features and execution
   analytics need time, and features need a minute to close);
3. P&L accuracy (publishes the test fills; money in several currencies, whose FX
   quotes it then moves; generates the report);
4. data flow (queries every hop of what 2 and 3 published);
5. performance (cache reads, latency probes, then the writer load), after the checks
   that compare values, so its load cannot delay them;
6. features online (its minute has closed by now, or the run waits for it);
7. integration, last look: /health again and the logs since the start.

`--start` also writes the reference data its services read (the deployment's, plus the
validation instruments of the multiplier and multi-currency scenarios) and points them
at it with POSTTRADE__REFERENCE_FILE; against running services the gate reads theirs
and skips, with a note, the scenarios it has no instruments for.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from .. import stack
from ..config import SERVICES, ConfigError, default_config_dir, load_config
from ..core.reference import REFERENCE_FILE, Reference, ReferenceError
from . import accuracy, dataflow, integration, performance
from .context import GateContext, GateError, Targets, account_name, default_log_dir, new_run_id, service_urls
from .expected import currency_plan, multiplier_instrument, validation_reference, with_validation
from .report import Check, GateReport

#: The variable that points every service at a reference data file (`reference_file`).
REFERENCE_ENV = "POSTTRADE__REFERENCE_FILE"


@dataclass
class GateOptions:
    url_overrides: dict[str, str] = field(default_factory=dict)
    start: bool = False
    json_path: Path | None = None
    log_dir: Path | None = None
    home: Path | None = None  # with --start: the fleet's home (logs); default the stack's
    writer_rows: int = 100_000
    latency_probes: int = 200
    cache_reads: int = 300
    start_timeout_s: float = 180.0
    # How long the gate waits for the services to catch up with their streams before it
    # publishes anything (integration.wait_caught_up).
    catch_up_timeout_s: float = 180.0
    ptrc_token: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


Progress = Callable[[str], None]


def stderr_progress() -> Progress:
    """Progress lines on stderr, with the seconds since the run began."""
    began = time.monotonic()

    def show(message: str) -> None:
        print(f"validate [{time.monotonic() - began:6.1f}s] {message}", file=sys.stderr, flush=True)

    return show


def _silent(message: str) -> None:
    pass


def ptrc_settings(environ: Mapping[str, str]) -> tuple[Reference | None, str, str | None]:
    """(reference data, trades table, why they could not be read) from ptrc's config as
    this environment sees it (file + overrides; the reference data its `reference_file`
    names, else reference.yaml in the config folder)."""
    from ..services.ptrc import CONFIG

    try:
        config = load_config("ptrc", CONFIG, env=environ)
    except ConfigError as exc:
        return None, "ptrc_trades", str(exc)
    try:
        return config.reference(), config.reports.trades_table, None
    except ConfigError as exc:
        return None, config.reports.trades_table, str(exc)


def deployment_reference(environ: Mapping[str, str]) -> tuple[Path, dict]:
    """The reference data file the services read in this environment, and its sections
    as written there (empty when the default file does not exist)."""
    from ..services.ptrc import CONFIG

    try:
        configured = load_config("ptrc", CONFIG, env=environ).reference_file
    except ConfigError as exc:
        raise GateError(f"ptrc's config: {exc}") from None
    path = Path(configured) if configured else default_config_dir() / REFERENCE_FILE
    if not configured and not path.exists():
        return path, {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise GateError(f"the reference data {path}: {exc}") from None
    if not isinstance(data, dict):
        raise GateError(f"the reference data {path}: the top level must be a mapping")
    return path, data


def write_reference(home: Path, run_id: str, environ: Mapping[str, str]) -> Path:
    """`--start`'s reference data: the deployment's plus the validation instruments (and,
    for this run's account, `<account>-XVE` based in XVE), written under the home for the
    services it starts (expected.validation_reference; the deployment's entries win)."""
    source, data = deployment_reference(environ)
    try:
        base = Reference.from_data(data).default_base_currency
    except ReferenceError as exc:
        raise GateError(f"the reference data {source}: {exc}") from None
    merged = with_validation(data, validation_reference(base, account_name(run_id)))
    try:
        Reference.from_data(merged)
    except ReferenceError as exc:
        raise GateError(f"the validation instruments do not fit the reference data {source}: {exc}") from None
    path = home / "validate" / REFERENCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Written by `posttrade validate --start` (run {run_id}): {source}\n"
        "# plus the gate's validation instruments (posttrade/validate/expected.py, validation_reference).\n"
        + yaml.safe_dump(merged, sort_keys=False)
    )
    return path.absolute()


def log_files(options: GateOptions, ep: stack.Endpoints, fleet_logs: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Each service's log: under --log-dir, else where the fleet writes it, else under
    `<home>/logs/services/`."""
    if options.log_dir is None and fleet_logs:
        return dict(fleet_logs)
    log_dir = options.log_dir or default_log_dir(options.home or ep.home)
    return {service: log_dir / f"{service}.log" for service in SERVICES}


def resolve_targets(options: GateOptions, ep: stack.Endpoints, logs: Mapping[str, Path],
                    fleet_urls: Mapping[str, str] | None = None) -> Targets:  # fmt: skip
    overrides = options.url_overrides
    return Targets(
        services=dict(fleet_urls) if fleet_urls else service_urls(overrides, options.environ),
        nats_url=overrides.get("nats") or options.environ.get("POSTTRADE__NATS__URL") or ep.nats_url,
        questdb_url=overrides.get("questdb") or ep.questdb_http_url,
        log_dir=next(iter(logs.values())).parent,
        logs=dict(logs),
        ptrc_token=options.ptrc_token,
    )


async def run_gate(targets: Targets, options: GateOptions, *, watch: integration.LogWatch | None = None,
                   crashed: Callable[[], list] | None = None, pids: Mapping[str, int | None] | None = None,
                   progress: Progress = _silent, run_id: str | None = None) -> GateReport:  # fmt: skip
    """The four tests against running services; never raises for a failing service
    (that is a FAIL in the report), only GateError when nothing can be reached."""
    watch = watch or integration.LogWatch(targets.logs)
    reference, trades_table, config_problem = ptrc_settings(options.environ)
    reference = reference or Reference()
    multiplier = multiplier_instrument(reference)
    async with GateContext(targets, run_id) as ctx:
        report = GateReport(ctx.run_id, ctx.started_at, targets.urls())
        if config_problem:
            report.notes.append(f"ptrc's config could not be read ({config_problem}); assumed defaults")
        if multiplier is None:
            report.notes.append(
                "no multiplier scenario: the reference data has no `validate*` instrument with a multiplier "
                "(e.g. VALIDATE_MULT: {multiplier: 50}; --start adds it)"
            )
        # The multiplier scenario quotes its instrument at a mark of its own.
        currencies = currency_plan(reference, ctx.account, taken=[multiplier[0]] if multiplier else [])
        report.notes.extend(currencies.notes)
        ctx.state["ptrc_trades_table"] = trades_table
        ctx.state["service_pids"] = dict(pids or {})  # known when the services run here (--start)
        progress(f"run {ctx.run_id}: account {ctx.account}; services {', '.join(f'{k}={v}' for k, v in targets.services.items())}")
        first_health = await integration.health_all(ctx)
        down = [h.service for h in first_health if h.status is None]
        if len(down) == len(SERVICES):
            raise GateError(
                "no service answers /health at " + ", ".join(targets.services.values())
                + ". Start them (posttrade up), point at them (--url service=URL), or use --start."
            )
        waited, behind = await integration.wait_caught_up(ctx, options.catch_up_timeout_s)
        report.timings["catch_up"] = round(waited, 2)
        if waited >= 1:
            progress(f"the services caught up with their streams in {waited:.0f} s" if not behind else
                     f"still behind their streams after {waited:.0f} s: {behind}")  # fmt: skip
        if behind:
            lags = ", ".join(f"{agent}: {lag}" for agent, lag in sorted(behind.items()))
            report.notes.append(
                f"after {waited:.0f} s some agents were still behind their streams ({lags}); "
                "checks that wait for the test data may time out"
            )
        await dataflow.publish_market_data(ctx)
        steps = (
            ("1/4 P&L accuracy: test fills published, comparing ptrc, pnl and the report",
             "accuracy", lambda: accuracy.run(ctx, multiplier, reference, currencies)),
            ("2/4 data flow: QuestDB, P&L history, object storage, Valkey, ClickHouse",
             "dataflow", lambda: dataflow.run(ctx)),
            (f"3/4 performance: {options.cache_reads} cache reads, {options.latency_probes} latency probes, "
             f"{options.writer_rows:,} writer rows", "performance",
             lambda: performance.run(ctx, reads=options.cache_reads, writer_rows=options.writer_rows,
                                     probes=options.latency_probes)),
            ("2/4 data flow: features online (waits for the test minute to close)",
             "features", lambda: _one(dataflow.features_online(ctx))),
        )  # fmt: skip
        for message, step, run_step in steps:
            progress(message)
            began = time.monotonic()
            report.add(*await run_step())
            report.timings[step] = round(time.monotonic() - began, 2)
        await _purge_writer_load(ctx, report)
        progress("4/4 integration: health and logs")
        report.add(*integration.health_checks(first_health, await integration.health_all(ctx)))
        report.add(integration.log_check(watch, targets.log_dir))
        if crashed is not None:
            report.add(integration.crash_check(crashed()))
    report.checks.sort(key=lambda c: c.section)  # stable: each test's checks keep their order
    report.finish()
    return report


async def _one(check: Awaitable[Check]) -> list[Check]:
    return [await check]


async def _purge_writer_load(ctx: GateContext, report: GateReport) -> None:
    """The writer's load is the one bulky thing a run publishes: take it out of the
    stream again (QuestDB keeps its rows, under the run's own symbol)."""
    load = ctx.state.get("writer_load_subject")
    if load is None:
        return
    stream, subject = load
    try:
        await ctx.js.purge_stream(stream, subject=subject)
    except Exception as exc:  # noqa: BLE001 - only housekeeping
        report.notes.append(f"could not purge {subject} from {stream}: {exc!r}")


def default_json_path(home: Path, run_id: str) -> Path:
    return home / "validate" / f"validate-{run_id}.json"


def run(options: GateOptions, progress: Progress | None = None) -> tuple[GateReport, Path]:
    """Everything `posttrade validate` does; returns the report and where its JSON is."""
    progress = progress or stderr_progress()
    ep = stack.endpoints(options.environ)
    if not options.start:
        targets = resolve_targets(options, ep, log_files(options, ep))
        report = asyncio.run(run_gate(targets, options, progress=progress))
        path = options.json_path or default_json_path(options.home or ep.home, report.run_id)
        report.write_json(path)
        return report, path
    return _run_started(options, ep, progress)


def _fleet_ports(options: GateOptions) -> dict[str, int]:
    """The ports `--url` gives the services `--start` runs; the others keep their config's."""
    ports = {}
    for service, url in options.url_overrides.items():
        if service in SERVICES:
            parsed = urlsplit(url)
            if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
                raise GateError(f"--start runs the services here: --url {service}= needs http://127.0.0.1:PORT")
            ports[service] = parsed.port
    return ports


def _run_started(options: GateOptions, ep: stack.Endpoints, progress: Progress) -> tuple[GateReport, Path]:
    """--start: the stack if it is not up, then the six services; stop both afterwards."""
    from ..stack.fleet import FleetError, ServiceFleet

    home = options.home or ep.home
    # The fleet gives its services this process's environment and the stack's; what the
    # gate adds is its reference data: the deployment's plus the validation instruments.
    run_id = new_run_id()  # before the services start: the reference data names its account
    extra_env = {REFERENCE_ENV: str(write_reference(home, run_id, options.environ))}
    options = replace(options, environ={**options.environ, **extra_env})
    progress(f"starting the local stack under {ep.home} (servers already running are kept)")
    try:
        states = stack.up(ep)
    except stack.StackError as exc:
        raise GateError(f"the local stack did not start: {exc}") from None
    started_servers = [state.server.name for state in states if state.started]
    fleet = None
    try:
        try:
            fleet = ServiceFleet(home, env=extra_env, ports=_fleet_ports(options))
            logs = log_files(options, ep, {service: fleet.log_path(service) for service in SERVICES})
            watch = integration.LogWatch(logs)  # before the start: errors while starting count too
            progress("starting the six services")
            fleet.start(timeout=options.start_timeout_s)
        except FleetError as exc:
            raise GateError(f"the services did not start: {exc}") from None
        targets = resolve_targets(options, ep, logs, fleet.urls())
        report = asyncio.run(
            run_gate(targets, options, watch=watch, crashed=fleet.crashed, pids=fleet.pids(), progress=progress,
                     run_id=run_id)  # fmt: skip
        )
    finally:
        progress("stopping what --start started")
        if fleet is not None:
            fleet.stop()
        if started_servers:
            stack.down(ep, names=started_servers)
    path = options.json_path or default_json_path(home, report.run_id)
    report.write_json(path)
    return report, path
