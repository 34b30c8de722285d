"""Tokens on the running services: the six as processes, each with an auth token and a
read-only token (tests/integration/token_fleet.py).

* every operation /openapi.json marks with the bearer scheme answers 401 (JSON, with
  `WWW-Authenticate`) without a token and with a wrong one; the others are the open
  ones: /health, /metrics, /openapi.json and the counters pages;
* every account-data read answers its normal success with the read-only token as with
  the full one;
* every change answers 403 to the read-only token and its success to the full one (a
  report generated, a reconciliation started, a materialization run).
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest

from posttrade.config import SERVICES

from .token_fleet import token_fleet

OPEN = {
    "ptrc": {"/health", "/metrics", "/openapi.json", "/stats"},
    "pnl": {"/health", "/metrics", "/openapi.json"},
    "hot_cache": {"/health", "/metrics", "/openapi.json", "/cache/stats"},
    "questdb_writer": {"/health", "/metrics", "/openapi.json", "/stats"},
    "feast_pipeline": {"/health", "/metrics", "/openapi.json", "/features/status"},
    "execution_quality": {"/health", "/metrics", "/openapi.json"},
}

# Account-data reads and what they answer with a token. Lookups of a name nothing has
# (a symbol without bars) answer 404 after the token check: the token was taken.
READS = {
    "ptrc": [("/positions", 200), ("/amendments", 200), ("/pnl/summary", 200), ("/marks", 200),
             ("/compliance/alerts", 200), ("/reconciliation", 200), ("/reports", 200)],
    "pnl": [("/pnl/realtime?account=AUTH-TEST-NOBODY", 200), ("/pnl/history", 200)],
    "hot_cache": [("/bars/AUTH-TEST-NONE", 404), ("/quotes/AUTH-TEST-NONE", 404), ("/positions/AUTH-TEST-NOBODY", 404)],
    "questdb_writer": [],
    "feast_pipeline": [("/features/online?symbol=AUTH-TEST-NONE", 200)],
    "execution_quality": [("/metrics/execution", 200), ("/analytics/summary", 200)],
}  # fmt: skip


@pytest.fixture(scope="module")
def fleet(stack, tmp_path_factory):
    with token_fleet(stack, tmp_path_factory.mktemp("auth")) as running:
        yield running


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("name", SERVICES)
def test_every_protected_operation_refuses_a_request_without_the_token(fleet, name):
    procs, tokens = fleet
    url = procs[name].url
    document = httpx.get(f"{url}/openapi.json", timeout=30).json()
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    open_paths = set()
    for path, item in document["paths"].items():
        concrete = re.sub(r"{[^}]+}", "AUTH-TEST", path)
        for method, operation in item.items():
            if "security" not in operation:
                open_paths.add(path)
                assert method == "get", (name, method, path)
                assert httpx.get(f"{url}{concrete}", timeout=30).status_code in (200, 503), (name, path)
                continue
            for headers in ({}, bearer("not-the-token"), {"Authorization": tokens.full}):
                response = httpx.request(method, f"{url}{concrete}", headers=headers, timeout=30)
                assert response.status_code == 401, (name, method, path, headers, response.text)
                assert response.json()["error"] == "unauthorized"
                assert response.headers["www-authenticate"].startswith("Bearer")
    assert open_paths == OPEN[name]


@pytest.mark.parametrize("name", SERVICES)
def test_both_tokens_read_account_data(fleet, name):
    procs, tokens = fleet
    for path, status in READS[name]:
        for token in (tokens.read, tokens.full):
            response = httpx.get(f"{procs[name].url}{path}", headers=bearer(token), timeout=60)
            assert response.status_code == status, (name, path, response.text[:500])


def test_only_the_full_token_generates_and_downloads_reports(fleet):
    procs, tokens = fleet
    ptrc = procs["ptrc"].url
    body = {"date": (date.today() - timedelta(days=400)).isoformat(), "kinds": ["compliance"]}
    refused = httpx.post(f"{ptrc}/reports", json=body, headers=bearer(tokens.read), timeout=60)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert httpx.post(f"{ptrc}/reports", json=body, timeout=60).status_code == 401
    made = httpx.post(f"{ptrc}/reports", json=body, headers=bearer(tokens.full), timeout=120)
    assert made.status_code == 201, made.text
    name = made.json()["reports"][0]["name"]
    for token in (tokens.read, tokens.full):
        download = httpx.get(f"{ptrc}/reports/{name}", headers=bearer(token), timeout=60)
        assert download.status_code == 200 and download.content
    assert httpx.get(f"{ptrc}/reports/{name}", timeout=60).status_code == 401


def test_only_the_full_token_starts_a_reconciliation(fleet):
    procs, tokens = fleet
    ptrc = procs["ptrc"].url
    # From now: nothing to replay, so the run is quick and the stack's history is left alone.
    body = {"from_time": datetime.now(timezone.utc).isoformat()}
    refused = httpx.post(f"{ptrc}/reconciliation", json=body, headers=bearer(tokens.read), timeout=60)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert httpx.post(f"{ptrc}/reconciliation", json=body, timeout=60).status_code == 401
    started = httpx.post(f"{ptrc}/reconciliation", json=body, headers=bearer(tokens.full), timeout=60)
    assert started.status_code == 202, started.text
    run_url = f"{ptrc}{started.json()['url']}"
    assert httpx.get(run_url, timeout=30).status_code == 401
    deadline = time.monotonic() + 120
    while True:
        run = httpx.get(run_url, headers=bearer(tokens.read), timeout=30)
        assert run.status_code == 200, run.text
        if run.json()["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert run.json()["status"] == "done", run.text


def test_only_the_full_token_materializes_features(fleet):
    procs, tokens = fleet
    feast = procs["feast_pipeline"].url
    refused = httpx.post(f"{feast}/features/materialize", headers=bearer(tokens.read), timeout=60)
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
    assert httpx.post(f"{feast}/features/materialize", timeout=60).status_code == 401
    run = httpx.post(f"{feast}/features/materialize", headers=bearer(tokens.full), timeout=300)
    assert run.status_code == 200, run.text
