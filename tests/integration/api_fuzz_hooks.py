"""schemathesis hooks for tests/integration/test_api_fuzz.py (loaded by the CLI through
`SCHEMATHESIS_HOOKS=tests.integration.api_fuzz_hooks`).

`posttrade_positive_data_acceptance` replaces schemathesis' `positive_data_acceptance`:
a request valid by the OpenAPI document must not be refused, except for the rules no
JSON Schema of a single parameter can state. Those are listed here, one by one, each
matched on the 400's own words and documented on its operation:

* between parameters: `from` before `to`; a history range of at most
  `history.max_points` intervals; exactly one of `symbol` / `account`; a feature of the
  entity asked for; `from_seq` xor `from_time`, `statement` xor `statement_path`, an
  option given once (query or body);
* against the service's state or configuration: a report day that has not started;
  `statement_path` while `reconciliation.statement_dir` is unset;
* inside a value: a reconciliation statement is CSV whose lines must parse.

Anything else valid by the schema and answered 4xx (but 401/403/404/409, which depend
on credentials and data) fails the run.
"""

from __future__ import annotations

import json

import schemathesis

ALLOWED_REFUSALS: dict[str, tuple[str, ...]] = {
    "GET /metrics/execution": ("must be after from",),
    "GET /analytics/summary": ("must be after from",),
    "GET /pnl/history": ("must be before to", "points over the range"),
    "GET /features/online": (
        "give exactly one of symbol or account",
        "unknown symbol feature",
        "unknown account feature",
        "is in several views",
    ),
    "POST /reports": ("has not started yet",),
    "POST /reconciliation": (
        "give from_seq or from_time, not both",
        "give statement or statement_path, not both",
        "given in both the query string and the body",
        "statement paths are disabled",
        "invalid statement",
        "the statement is not UTF-8 text",
    ),
}

ACCEPTED = {401, 403, 404, 409, 429}


@schemathesis.check
def posttrade_positive_data_acceptance(ctx, response, case):
    """A schema-valid request is accepted, but for the documented cross-field refusals."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status < 400 or status >= 500 or status in ACCEPTED:
        return None
    label = f"{case.method.upper()} {case.operation.path}"
    text = response.text
    if status == 400 and any(needle in text for needle in ALLOWED_REFUSALS.get(label, ())):
        return None
    try:
        detail = json.loads(text).get("detail")
    except (ValueError, AttributeError):
        detail = text[:300]
    raise AssertionError(f"{label}: a request valid by the schema got {status}: {detail}")
