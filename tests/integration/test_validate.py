"""The whole validation gate, as `make test` runs it once: `posttrade validate --start`
against the local stack, with the six services on free ports under unique names (so
their durable consumers are their own, starting at the end of the shared streams) and a
home of their own (logs, reports, embedded ClickHouse, Feast)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from posttrade.config import SERVICES
from posttrade.streams.nats import forget_apps


REPO = Path(__file__).resolve().parents[2]


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports: each socket stays bound until all are picked (a port
    picked and released can come back at the next pick)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_the_gate_passes_against_services_it_starts(stack, tmp_path: Path):
    tag = uuid.uuid4().hex[:6]
    env = {**os.environ, "POSTTRADE__RUNTIME__START_FROM": "new", "PYTHONPATH": str(REPO)}
    urls = []
    *ports, metrics_port = free_ports(len(SERVICES) + 1)
    for service, port in zip(SERVICES, ports):
        env[f"POSTTRADE_{service.upper()}__SERVICE__NAME"] = f"{service}_val_{tag}"
        urls += ["--url", f"{service}=http://127.0.0.1:{port}"]
    env["POSTTRADE_PTRC__SERVICE__METRICS_PORT"] = str(metrics_port)
    result_path = tmp_path / "validate.json"
    done = subprocess.run(
        [sys.executable, "-m", "posttrade.cli", "validate", "--start", "--home", str(tmp_path / "home"),
         "--json", str(result_path), *urls],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    asyncio.run(forget_apps(stack.nats_url, [f"{service}_val_{tag}" for service in SERVICES]))
    shown = f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, shown
    result = json.loads(result_path.read_text())
    assert result["status"] == "PASS", shown
    failing = [c["name"] for c in result["checks"] if c["status"] != "PASS"]
    assert failing == [], shown
    names = {c["name"] for c in result["checks"]}
    # Every part of the gate ran, including the multiplier and multi-currency scenarios
    # of the reference data --start writes.
    assert {c["section"] for c in result["checks"]} == {1, 2, 3, 4}
    assert {"accuracy.report", "accuracy.currencies", "accuracy.fx_move", "dataflow.features_online",
            "performance.writer_rows_per_s", "integration.logs", "integration.processes"} <= names  # fmt: skip
    assert result["notes"] == [], result["notes"]
    written = (tmp_path / "home" / "validate" / "reference.yaml").read_text()
    assert "VALIDATE_MULT" in written and "VALIDATE_USDXVJ" in written and f"VALIDATE-{result['run_id']}-XVE" in written
