"""`posttrade stack`: the local servers (NATS JetStream, Valkey, QuestDB, SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from posttrade.stack import (
    HOME_ENV,
    NATS_CLUSTER_ENV,
    PORT_ENV,
    Endpoints,
    ServerState,
    StackError,
    StopResult,
    chdb_version,
    down,
    endpoints,
    fetch_questdb_jar,
    logfile,
    status,
    up,
)

ACTIONS = {
    "up": "start the servers that are not running and wait until all answer health checks",
    "down": "stop the servers `up` started",
    "status": "show each server and its health; exit 0 only when all are healthy",
    "env": "print `export` lines that point the services at the stack",
    "fetch": "download the pinned QuestDB jar into the cache (make setup does this)",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    # The flags go on every action (`posttrade stack up --nats-port 4333`), where users type them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, help=f"data folder (env {HOME_ENV}, default ./.posttrade)")
    for field, var in PORT_ENV.items():
        default = Endpoints.__dataclass_fields__[field].default
        common.add_argument(
            "--" + field.replace("_", "-"), type=int, dest=field, metavar="PORT",
            help=f"env {var}, default {default}",
        )  # fmt: skip
    common.add_argument(
        "--nats-cluster", type=int, choices=(1, 3, 5), metavar="NODES",
        help=f"run NATS as a cluster of 3 (or 5) nodes, node i on the NATS ports + i; the services then "
             f"use replicas 3 (env {NATS_CLUSTER_ENV}; default: the layout `up` last started, else 1)",
    )  # fmt: skip
    parser = subparsers.add_parser("stack", help="run the local servers on 127.0.0.1", description=__doc__)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in ACTIONS.items():
        actions.add_parser(name, parents=[common], help=help_text, description=help_text)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        ports = {field: getattr(args, field) for field in PORT_ENV}
        ep = endpoints(home=args.home, nats_cluster=args.nats_cluster, **ports)
        return HANDLERS[args.action](ep)
    except (StackError, ValueError) as exc:
        print(f"posttrade stack {args.action}: {exc}", file=sys.stderr)
        return 1


def _up(ep: Endpoints) -> int:
    print(f"posttrade stack: bringing up the servers under {_shown(ep.home)} ...", flush=True)
    states = up(ep)
    _print_table(ep, states, lambda s: "started" if s.started else "already running")
    ok = _print_clickhouse(ep)
    print("\nPoint the services at it: eval \"$(posttrade stack env)\"")
    print("Stop it with:              posttrade stack down   (or: make down)")
    return 0 if ok else 1


def _down(ep: Endpoints) -> int:
    return print_stops(down(ep))


def print_stops(results: list[StopResult]) -> int:
    """One line per stopped process; 1 when one is still running, else 0."""
    for result in results:
        print(result)
    return 1 if any(result.outcome == "still running" for result in results) else 0


def _status(ep: Endpoints) -> int:
    states = status(ep)
    _print_table(ep, states, lambda s: "stopped" if s.pid is None else "healthy" if s.healthy else "UNHEALTHY")
    ok = _print_clickhouse(ep)
    return 0 if ok and all(state.healthy for state in states) else 1


def _env(ep: Endpoints) -> int:
    for name, value in {HOME_ENV: str(ep.home), **ep.service_env()}.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _fetch(ep: Endpoints) -> int:
    print(fetch_questdb_jar())
    return 0


HANDLERS = {"up": _up, "down": _down, "status": _status, "env": _env, "fetch": _fetch}


def _shown(path: Path) -> str:
    # Relative to where the user stands when that is shorter; absolute otherwise.
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def _print_table(ep: Endpoints, states: list[ServerState], state_text) -> None:
    rows = [("SERVER", "STATE", "PID", "ADDRESS", "DATA", "LOG")]
    for s in states:
        rows.append((
            s.server.name, state_text(s), str(s.pid or "-"), s.server.address(ep),
            _shown(s.server.data_dir(ep)), _shown(logfile(ep, s.server)),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_clickhouse(ep: Endpoints) -> bool:
    try:
        version = chdb_version()
    except StackError as exc:
        print(f"\nclickhouse: {exc}")
        return False
    print(f"\nclickhouse: embedded (chdb {version}), data under {_shown(ep.chdb_dir)}/<service>")
    return True
