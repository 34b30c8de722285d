"""The gate's run: find (or start) the stack and the six services, run the four tests
in order, stop what it started, and hand back the report.

Order, and why:
1. integration, first look: /health of every service, and where each log ends;
2. market data and an order/fill published early (bars, features and execution
   analytics need time, and features need a minute to close);
3. P&L accuracy (publishes the test fills, generates the report);
4. data flow (queries every hop of what 2 and 3 published);
5. performance (cache reads, latency probes, then the writer load), after the checks
   that compare values, so its load cannot delay them;
6. features online (its minute has closed by now, or the run waits for it);
7. integration, last look: /health again and the logs since the start.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from .. import stack
from ..config import SERVICES, ConfigError, load_config
from . import accuracy, dataflow, integration, performance
from .context import GateContext, GateError, Targets, default_log_dir, service_urls
from .expected import multiplier_instrument
from .report import Check, GateReport

#: The instrument `--start` gives ptrc for the multiplier scenario (env keys are lower case).
START_MULTIPLIER_ENV = {"POSTTRADE_PTRC__INSTRUMENTS__VALIDATE_MULT__MULTIPLIER": "50"}


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


def ptrc_settings(environ: Mapping[str, str]) -> tuple[tuple[str, Decimal] | None, str, str | None]:
    """(validation instrument, trades table, why the config could not be read) from
    ptrc's config as this environment sees it (file + overrides)."""
    from ..services.ptrc import CONFIG

    try:
        config = load_config("ptrc", CONFIG, env=environ)
    except ConfigError as exc:
        return None, "ptrc_trades", str(exc)
    return multiplier_instrument(config.instruments), config.reports.trades_table, None


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
    multiplier, trades_table, config_problem = ptrc_settings(options.environ)
    async with GateContext(targets, run_id) as ctx:
        report = GateReport(ctx.run_id, ctx.started_at, targets.urls())
        if config_problem:
            report.notes.append(f"ptrc's config could not be read ({config_problem}); assumed defaults")
        if multiplier is None:
            report.notes.append(
                "no multiplier scenario: ptrc has no `validate*` instrument with a multiplier "
                "(e.g. POSTTRADE_PTRC__INSTRUMENTS__VALIDATE_MULT__MULTIPLIER=50; --start sets it)"
            )
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
        await dataflow.publish_market_data(ctx)
        steps = (
            ("1/4 P&L accuracy: test fills published, comparing ptrc, pnl and the report",
             "accuracy", lambda: accuracy.run(ctx, multiplier)),
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
    # gate adds is the validation instrument, unless ptrc's config has one already.
    extra_env = {} if ptrc_settings(options.environ)[0] is not None else dict(START_MULTIPLIER_ENV)
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
            run_gate(targets, options, watch=watch, crashed=fleet.crashed, pids=fleet.pids(), progress=progress)
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
