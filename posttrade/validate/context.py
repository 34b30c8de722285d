"""What every part of the gate shares: where the services are, the run's names, and
the clients (HTTP, NATS, QuestDB SQL) to publish test data and query each hop.

Every name a run creates carries its run id (`VALIDATE-<id>` accounts, `VAL<id>-...`
symbols), so a running demo feed, other users and earlier runs never meet its data.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import nats

from ..config import SERVICES
from ..stack.fleet import FleetError, service_section
from ..stores.questdb import QuestDBClient
from ..streams.events import encode
from ..streams.nats import server_urls, without_passwords

#: Besides the services, `--url` accepts these two servers.
SERVERS = ("nats", "questdb")
URL_ENV = "POSTTRADE_{name}_URL"  # e.g. POSTTRADE_PTRC_URL=http://10.0.0.5:8109

T = TypeVar("T")


class GateError(Exception):
    """The gate cannot run at all (bad arguments, nothing to talk to)."""


@dataclass(frozen=True)
class Targets:
    """Where the gate looks: each service's base URL, NATS, QuestDB, the service logs."""

    services: dict[str, str]
    nats_url: str
    questdb_url: str
    log_dir: Path | None
    logs: dict[str, Path] = field(default_factory=dict)  # service -> its log file
    ptrc_token: str | None = None

    def urls(self) -> dict[str, str]:
        return {**self.services, "nats": without_passwords(self.nats_url), "questdb": self.questdb_url}


def parse_url_overrides(pairs: list[str] | None) -> dict[str, str]:
    """`--url service=http://host:port` (repeatable) as a dict; GateError when malformed."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, url = pair.partition("=")
        name = name.strip()
        if not sep or not url.strip():
            raise GateError(f"--url {pair!r}: expected NAME=URL, e.g. ptrc=http://127.0.0.1:8109")
        if name not in SERVICES and name not in SERVERS:
            raise GateError(f"--url {pair!r}: unknown name {name!r}; one of {', '.join((*SERVICES, *SERVERS))}")
        out[name] = url.strip().rstrip("/")
    return out


def service_urls(overrides: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """Each service's URL: `--url`, else `POSTTRADE_<SERVICE>_URL`, else the port its
    config gives (`service.port`, environment overrides included) on 127.0.0.1."""
    urls = {}
    for service in SERVICES:
        env_url = environ.get(URL_ENV.format(name=service.upper()))
        urls[service] = overrides.get(service) or (
            env_url.rstrip("/") if env_url else f"http://127.0.0.1:{configured_port(service, environ)}"
        )
    return urls


def configured_port(service: str, environ: Mapping[str, str]) -> int:
    try:
        return int(service_section(service, environ)["port"])
    except (FleetError, KeyError, TypeError, ValueError) as exc:
        raise GateError(f"{service}: no usable service.port in its config ({exc})") from None



def new_run_id() -> str:
    return secrets.token_hex(4).upper()


def account_name(run_id: str) -> str:
    """The run's account; its sub-accounts are `<account>-<suffix>`."""
    return f"VALIDATE-{run_id}"


async def settle(
    fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float, interval: float = 0.2
) -> tuple[T, bool]:
    """Call `fetch` until `done(result)` or `timeout` seconds; (last result, whether done).

    Services are eventually consistent (a fill reaches ptrc, then pnl, then QuestDB), so
    every check waits for its surface to show the expected state, and on a timeout
    compares what it last saw: the differences are the evidence.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = await fetch()
        if done(result):
            return result, True
        if time.monotonic() >= deadline:
            return result, False
        await asyncio.sleep(interval)


class ServiceError(Exception):
    """A service answered with an error or not at all; the message says which and how."""


class GateContext:
    """The run's names and open clients; `async with GateContext(targets) as ctx`."""

    def __init__(self, targets: Targets, run_id: str | None = None):
        self.targets = targets
        self.run_id = run_id or new_run_id()
        self.started_at = datetime.now(timezone.utc)
        self.started_ns = time.time_ns()
        self.account = account_name(self.run_id)
        # Filled in as the run goes, read by later parts (data flow reads what accuracy wrote).
        self.state: dict[str, Any] = {}
        self.http: httpx.AsyncClient | None = None
        self.nc: Any = None
        self.js: Any = None
        self.questdb: QuestDBClient | None = None

    def symbol(self, suffix: str) -> str:
        return f"VAL{self.run_id}-{suffix}"

    def sub_account(self, suffix: str) -> str:
        return f"{self.account}-{suffix}"

    async def __aenter__(self) -> GateContext:
        self.http = httpx.AsyncClient(timeout=30.0)
        url = self.targets.questdb_url
        scheme, _, rest = url.partition("://")
        host, _, port = rest.partition(":")
        self.questdb = QuestDBClient(host=host, port=int(port or 9000), tls=scheme == "https", timeout=30.0)
        try:
            self.nc = await nats.connect(
                servers=server_urls(self.targets.nats_url), name=f"posttrade-validate-{self.run_id}", connect_timeout=5,
                max_reconnect_attempts=3, reconnect_time_wait=0.5, pending_size=128 * 1024 * 1024,
            )  # fmt: skip
        except Exception as exc:
            await self.aclose()
            raise GateError(f"cannot connect to NATS at {without_passwords(self.targets.nats_url)}: {exc!r}") from None
        self.js = self.nc.jetstream()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.drain()
        if self.http is not None:
            await self.http.aclose()
        if self.questdb is not None:
            await self.questdb.close()

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, subject: str, event: msgspec.Struct, msg_id: str) -> None:
        """Publish through JetStream and wait for the server to store it (a subject no
        stream takes is an error here, not a silent drop)."""
        await self.js.publish(subject, encode(event), headers={"Nats-Msg-Id": msg_id}, timeout=10)

    # -- HTTP ------------------------------------------------------------------------------

    def url(self, service: str, path: str) -> str:
        return self.targets.services[service] + path

    async def get_json(self, service: str, path: str, params: Mapping[str, Any] | None = None) -> Any:
        response = await self.get(service, path, params)
        if response.status_code != 200:
            raise ServiceError(f"{service} GET {path}: HTTP {response.status_code}: {response.text[:300]}")
        return _json(response, service, path)

    async def get(self, service: str, path: str, params: Mapping[str, Any] | None = None) -> httpx.Response:
        # ptrc's confidential pages (positions, P&L, reports) need its token when it has one.
        headers = {"Authorization": f"Bearer {self.targets.ptrc_token}"} if service == "ptrc" and self.targets.ptrc_token else {}
        try:
            return await self.http.get(self.url(service, path), params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise ServiceError(f"{service} GET {path}: {type(exc).__name__}: {exc}") from None

    async def post_json(self, service: str, path: str, body: Any) -> tuple[int, Any]:
        headers = {}
        if service == "ptrc" and self.targets.ptrc_token:
            headers["Authorization"] = f"Bearer {self.targets.ptrc_token}"
        try:
            response = await self.http.post(self.url(service, path), json=body, headers=headers, timeout=120.0)
        except httpx.HTTPError as exc:
            raise ServiceError(f"{service} POST {path}: {type(exc).__name__}: {exc}") from None
        return response.status_code, _json(response, service, path)

    async def sql(self, query: str) -> list[dict[str, Any]]:
        return (await self.questdb.query(query)).dicts()


def _json(response: httpx.Response, service: str, path: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ServiceError(f"{service} {path}: not JSON: {response.text[:300]}") from None


def default_log_dir(home: Path) -> Path:
    return home / "logs" / "services"
