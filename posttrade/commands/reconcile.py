"""`posttrade reconcile`: ask a running ptrc to reconcile, wait, print the breaks.

It starts a run with `POST /reconciliation`, polls `GET /reconciliation/{id}` until the
run is done and prints its breaks as a table (or the whole run as JSON with `--json`).
The statement file is read here and uploaded, so ptrc may run on another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

HELP = """\
Reconcile ptrc's live positions against a replay of the fill stream (and, with
--statement, an external statement) and print the breaks.

--from takes a stream sequence (digits) or an ISO-8601 time (UTC unless it has an
offset); without it the replay starts at the stream's start. The statement is CSV
with the columns account, symbol, net_qty, avg_open_price, realized_pnl (net of
fees); other columns are ignored.

Exit status: 0 no breaks; 1 breaks found; 2 the run could not be done (bad input,
ptrc unreachable, the run failed or timed out).
"""

TOKEN_ENV = "POSTTRADE_PTRC__SERVICE__AUTH_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reconcile",
        help="reconcile ptrc's live positions against a replay and a statement",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--from", dest="start", metavar="TIME|SEQ", help="where the replay starts (default: stream start)")
    parser.add_argument("--statement", metavar="FILE", help="external statement (CSV) to compare too")
    parser.add_argument("--url", default="http://127.0.0.1:8109", help="ptrc's API (default: %(default)s)")
    parser.add_argument("--tolerance-qty", metavar="X", help="quantity tolerance (default: ptrc's config)")
    parser.add_argument("--tolerance-avg-price", metavar="X", help="average price tolerance")
    parser.add_argument("--tolerance-realized-pnl", metavar="X", help="realized P&L tolerance")
    parser.add_argument("--token", help=f"bearer token for ptrc (default: ${TOKEN_ENV})")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the run (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the whole run as JSON")
    parser.set_defaults(handler=run)


class CommandError(Exception):
    pass


def build_request(args: argparse.Namespace) -> dict:
    body: dict = {}
    if args.start:
        start = args.start.strip()
        if start.isdigit():
            body["from_seq"] = int(start)
        else:
            body["from_time"] = start
    if args.statement:
        try:
            body["statement"] = Path(args.statement).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read the statement {args.statement}: {exc}") from None
    tolerance = {
        name: value
        for name, value in (("qty", args.tolerance_qty), ("avg_price", args.tolerance_avg_price),
                            ("realized_pnl", args.tolerance_realized_pnl))
        if value is not None
    }
    if tolerance:
        body["tolerance"] = tolerance
    return body


def reconcile(args: argparse.Namespace, *, poll_interval: float = 0.5) -> dict:
    """Start the run and wait for it; returns the finished run (CommandError otherwise)."""
    token = args.token or os.environ.get(TOKEN_ENV) or os.environ.get("POSTTRADE__SERVICE__AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = build_request(args)
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=60.0) as http:
            response = http.post("/reconciliation", json=body)
            if response.status_code != 202:
                raise CommandError(f"ptrc refused the run (HTTP {response.status_code}): {_detail(response)}")
            run_id = response.json()["id"]
            deadline = time.monotonic() + args.timeout
            while True:
                response = http.get(f"/reconciliation/{run_id}")
                if response.status_code != 200:
                    raise CommandError(f"reading run {run_id} failed (HTTP {response.status_code}): {_detail(response)}")
                result = response.json()
                if result["status"] != "running":
                    break
                if time.monotonic() > deadline:
                    raise CommandError(f"run {run_id} still running after {args.timeout:g}s")
                time.sleep(poll_interval)
    except httpx.HTTPError as exc:
        raise CommandError(f"cannot reach ptrc at {args.url}: {exc}") from None
    if result["status"] != "done":
        raise CommandError(f"run {run_id} failed: {result.get('error')}")
    return result


def _detail(response: httpx.Response) -> str:
    try:
        return json.dumps(response.json().get("detail"))
    except ValueError:
        return response.text[:500]


BREAK_COLUMNS = ("against", "account", "symbol", "field", "replay", "other", "difference", "value_at_mark")


def format_breaks(result: dict) -> str:
    """A plain-text table of the breaks and a one-line summary."""
    lines = [
        f"reconciliation {result['id']}: replayed {result['fills_replayed']} fills of {result['stream']} "
        f"through seq {result['cut_seq']} (stream at {result['stream_last_seq']}); "
        f"{result['replay_positions']} replayed, {result['live_positions']} live positions"
        + (f", {result['statement']['positions']} in the statement" if result.get("statement") else "")
    ]
    breaks = result["breaks"]
    if not breaks:
        lines.append("no breaks")
        return "\n".join(lines)
    rows = [[_cell(item.get(c)) for c in BREAK_COLUMNS] for item in breaks]
    for item, row in zip(breaks, rows):
        if item["field"] == "position":
            row[3] = f"missing from {item['missing_from']}"
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(BREAK_COLUMNS)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(BREAK_COLUMNS, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    shown = len(breaks)
    total = result["break_count"]
    lines.append(f"{total} break{'s' if total != 1 else ''}" + (f" ({shown} shown)" if shown < total else ""))
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else str(value)


def run(args: argparse.Namespace) -> int:
    try:
        result = reconcile(args)
    except CommandError as exc:
        print(f"posttrade reconcile: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_breaks(result))
    return 1 if result["break_count"] else 0
