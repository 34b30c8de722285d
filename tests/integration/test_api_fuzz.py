"""Every service's HTTP API fuzzed from its own /openapi.json by schemathesis.

The six services run as processes against the stack, each with an auth token and a
read-only token (tests/integration/token_fleet.py). One `st run` per service, all at
once, with the full token, through the phases that need no hand-written data:
`examples` (the document's own), `coverage` (every parameter's boundaries, empty and
missing values, wrong types, every undocumented method) and `fuzzing` (random valid and
invalid requests), a bounded number of cases per operation. Every check schemathesis has
runs (CHECKS says which do not, and why), and so:

* no answer is a 5xx (`not_a_server_error`);
* every answer has a documented status, content type and headers, and its body the
  documented schema (`status_code_conformance`, `content_type_conformance`,
  `response_headers_conformance`, `response_schema_conformance`);
* an invalid request is refused (`negative_data_rejection`), a valid one is not — but
  for the cross-field rules listed in api_fuzz_hooks.py (`posttrade_positive_data_acceptance`);
* a method the path does not serve is a 405 with `Allow` (`unsupported_method`,
  `allow_header_conformance`);
* an operation that declares the bearer scheme refuses a request without it
  (`ignored_auth`).

Not checked: response times (`max_response_time`): performance lives in benchmarks/,
never in timed assertions, and a machine shared with the stack makes them noise.

Bounded: at most MAX_EXAMPLES random cases per operation (the coverage phase adds its
boundary cases) and fewer for the costly ones: a report generation writes eight files, a
reconciliation replays the FILLS stream, and an unfiltered `/pnl/realtime` is as large as
the stack's shared POSITIONS history. `POSTTRADE_FUZZ_EXAMPLES` and `POSTTRADE_FUZZ_SEED`
change the bound and the seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from posttrade.config import SERVICES

from .service_process import REPO, ServiceProcess
from .token_fleet import Tokens, token_fleet

MAX_EXAMPLES = int(os.environ.get("POSTTRADE_FUZZ_EXAMPLES", "15"))
SEED = int(os.environ.get("POSTTRADE_FUZZ_SEED", "20261205"))
RUN_TIMEOUT_S = 480.0  # a bound for a hung run, not a performance goal

# Fewer random cases for the operations whose every call is expensive: service → (operation, cases).
COSTLY = {
    "ptrc": [("POST /reports", 3), ("POST /reconciliation", 3)],
    "pnl": [("GET /pnl/realtime", 3)],
    "feast_pipeline": [("POST /features/materialize", 2)],
}

# Every check schemathesis has, but: positive_data_acceptance (replaced, see above),
# max_response_time (not this test's subject), and those of phases not run here
# (use_after_free, ensure_resource_availability: stateful; object_level_authorization:
# a second user's credentials).
CHECKS = ["--checks", ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "negative_data_rejection", "missing_required_header", "unsupported_method",
    "allow_header_conformance", "ignored_auth", "posttrade_positive_data_acceptance",
])]


def config_file(service: str, path: Path) -> Path:
    """The schemathesis.toml of one service's run (an entry must match one of its operations)."""
    entries = [
        f'[[operations]]\ninclude-name = "{operation}"\ngeneration = {{ max-examples = {cases} }}\n'
        for operation, cases in COSTLY.get(service, [])
    ]
    path.write_text("\n".join(entries))
    return path


def st_run(service: str, url: str, token: str, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    config = config_file(service, out / "schemathesis.toml")
    args = [
        str(Path(sys.executable).with_name("st")), "--config-file", str(config), "--no-color", "run", f"{url}/openapi.json",
        "-H", f"Authorization: Bearer {token}",
        *CHECKS,
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--request-timeout", "60",
        "--suppress-health-check", "all",  # a loaded machine makes "too slow" meaningless
        "--report", "json,har", "--report-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.api_fuzz_hooks", "PYTHONPATH": str(REPO)}
    with (out / "st.log").open("wb") as log:
        return subprocess.Popen(args, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)


def report_of(out: Path) -> tuple[dict, list[dict]]:
    run = json.loads(next(out.glob("json-*.json")).read_text())
    har = json.loads(next(out.glob("har-*.json")).read_text())["log"]["entries"]
    return run, har


def test_no_service_answers_a_fuzzed_request_with_a_5xx_or_off_its_schema(stack, tmp_path):
    # Each service is fuzzed as soon as it is up: the slow starters (pnl reads the stack's
    # POSITIONS history) overlap with the long runs (ptrc has the most operations).
    tokens, runs, began = Tokens(), {}, time.monotonic()

    def fuzz(name: str, process: ServiceProcess, start_s: float) -> None:
        runs[name] = (st_run(name, process.url, tokens.full, tmp_path / name), start_s, time.monotonic())

    ended: dict[str, float] = {}
    try:
        with token_fleet(stack, tmp_path / "fleet", tokens=tokens, on_ready=fuzz) as (procs, _):
            assert set(runs) == set(SERVICES)
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while len(ended) < len(runs):
                for name, (run, _, _) in runs.items():
                    if name not in ended and (run.poll() is not None or time.monotonic() > deadline):
                        ended[name] = time.monotonic()
                        if run.poll() is None:
                            run.kill()  # hung: reported below with its log
                            run.wait()
                time.sleep(0.5)
    finally:
        for run, _, _ in runs.values():
            if run.poll() is None:  # the fleet failed to start: its runs have nothing to do
                run.kill()
                run.wait()
    seconds = time.monotonic() - began

    problems, lines, total = [], [], 0
    for name, (run, start_s, launched) in runs.items():
        out = tmp_path / name
        log = (out / "st.log").read_text(errors="replace")
        if run.returncode != 0:
            problems.append(f"--- {name}: st exited {run.returncode}\n{log[-6000:]}\n{procs[name].tail(2000)}")
            continue
        report, har = report_of(out)
        statuses = Counter(entry["response"]["status"] for entry in har)
        total += len(har)
        lines.append(
            f"{name}: started in {start_s:.0f} s, fuzzed in {ended[name] - launched:.0f} s: {len(har)} requests, "
            f"{report['test_cases']['generated']} cases over {report['operations']['tested']} operations, "
            f"statuses {dict(sorted(statuses.items()))}"
        )
        fives = [e["request"]["url"] for e in har if e["response"]["status"] >= 500]
        if fives or report["failures"] or report["errors"]:
            problems.append(f"--- {name}: 5xx {fives[:5]}, failures/errors in the report\n{log[-6000:]}")
    print(f"\nschemathesis: {total} requests to {len(runs)} services, {seconds:.0f} s with their starts (seed {SEED})")
    print("\n".join(lines))
    assert not problems, "\n".join(problems)
