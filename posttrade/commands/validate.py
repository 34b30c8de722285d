"""`posttrade validate`: run the SPEC's validation gate against the services.

Against running services (their documented ports on 127.0.0.1, or `--url`), or with
`--start` against a stack and services it starts and stops again. Prints a PASS/FAIL
table with the measured figure beside each criterion, writes the same as JSON, and
exits 0 only when every check passes. See docs/validate.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..validate.context import URL_ENV, GateError, parse_url_overrides
from ..validate.runner import GateOptions, run

EPILOG = f"""\
URLs: --url NAME=URL for a service (ptrc, pnl, hot_cache, questdb_writer,
feast_pipeline, execution_quality) or a server (nats, questdb); a service's URL can
also come from {URL_ENV.format(name="<SERVICE>")} (e.g. POSTTRADE_PTRC_URL). Otherwise the
documented ports on 127.0.0.1, and NATS/QuestDB where `posttrade stack env` says.

Exit status: 0 every check passed; 1 a check failed; 2 the gate could not run
(nothing answers, bad arguments, --start could not start the services).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate", help="run the validation gate (accuracy, data flow, performance, integration)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--url", action="append", metavar="NAME=URL", help="where a service or server is (repeatable)")
    parser.add_argument("--start", action="store_true",
                        help="start the local stack (if needed) and the six services, stop them afterwards")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="write the result here (default: <home>/validate/validate-<run id>.json)")  # fmt: skip
    parser.add_argument("--log-dir", type=Path, metavar="DIR",
                        help="the services' logs, <service>.log (default: <home>/logs/services)")  # fmt: skip
    parser.add_argument("--home", type=Path, metavar="DIR",
                        help="the services' home: logs and results (default: $POSTTRADE_HOME or ./.posttrade)")  # fmt: skip
    parser.add_argument("--writer-rows", type=int, default=100_000, metavar="N", help="rows of the writer load (100000)")
    parser.add_argument("--latency-probes", type=int, default=200, metavar="N", help="fills timed to /pnl/realtime (200)")
    parser.add_argument("--cache-reads", type=int, default=300, metavar="N", help="reads of the hit-rate pattern (300)")
    parser.add_argument("--token", help="ptrc's bearer token (default $POSTTRADE_PTRC__SERVICE__AUTH_TOKEN, else $POSTTRADE__SERVICE__AUTH_TOKEN)")
    parser.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    for name in ("writer_rows", "latency_probes", "cache_reads"):
        if getattr(args, name) < 1:
            print(f"posttrade validate: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        options = GateOptions(
            url_overrides=parse_url_overrides(args.url),
            start=args.start,
            json_path=args.json,
            log_dir=args.log_dir,
            home=args.home,
            writer_rows=args.writer_rows,
            latency_probes=args.latency_probes,
            cache_reads=args.cache_reads,
            ptrc_token=args.token
            or os.environ.get("POSTTRADE_PTRC__SERVICE__AUTH_TOKEN")
            or os.environ.get("POSTTRADE__SERVICE__AUTH_TOKEN")
            or None,
        )
        report, path = run(options)
    except GateError as exc:
        print(f"posttrade validate: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"JSON: {path}")
    return 0 if report.passed else 1
