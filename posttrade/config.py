"""Service configuration: YAML in `config/backend/<service>/config.yaml`, overridden
from the environment, validated into typed structs before anything starts.

Environment overrides name a path through the YAML with double underscores:

    POSTTRADE__DATABASES__QUESTDB__HOST=127.0.0.1        every service
    POSTTRADE_PTRC__SERVICE__PORT=18109                   only ptrc (wins over the above)

Values are parsed as YAML scalars (`8123` is an int, `true` a bool). Credentials are
never in the files: they come only from such variables (e.g.
`POSTTRADE__NATS__PASSWORD`). A missing or wrong value stops the service at start with
a `ConfigError` naming the key.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import msgspec
import yaml

from .core.reference import REFERENCE_FILE, Reference, ReferenceError

ENV_PREFIX = "POSTTRADE"
SERVICES = ("ptrc", "pnl", "hot_cache", "questdb_writer", "feast_pipeline", "execution_quality")


class ConfigError(ValueError):
    pass


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class TLSSection(_Section):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


class ServiceSection(_Section, kw_only=True):
    name: str
    # Loopback unless a deployment opens it: the compose file sets 0.0.0.0 for its containers.
    host: str = "127.0.0.1"
    port: int
    metrics_port: int | None = None  # a second port serving only /metrics
    # Bearer tokens, from the environment only (docs/configuration.md, "Access"). With
    # either set, account data and every state change need one (web/auth.py):
    auth_token: str | None = None  # reads and changes
    read_token: str | None = None  # reads only: a change with it is a 403
    protect_health: bool = False  # true: /health, /metrics, /openapi.json and public pages need a token too
    log_level: str = "INFO"
    # Prefixes every stream, subject, consumer and table bucket the service uses (App's
    # `namespace`): services on one bus with different namespaces never meet. Tests set
    # it; a deployment leaves it unset.
    namespace: str | None = None

    def __post_init__(self) -> None:
        for name in ("auth_token", "read_token"):
            token = getattr(self, name)
            if token is not None and not token.strip():
                raise ValueError(f"service.{name} is empty; unset it to run without a token")
        if self.read_token is not None and self.auth_token is None:
            raise ValueError("service.read_token needs service.auth_token (the token that may change state)")
        if self.read_token is not None and self.read_token == self.auth_token:
            raise ValueError("service.read_token must differ from service.auth_token")


class NatsSection(_Section):
    # One server, or a cluster's: a YAML list, or one comma-separated string (what an
    # environment variable holds). The client connects through any of them that answers.
    url: str | list[str] = "nats://nats:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    tls: TLSSection | None = None
    replicas: int = 1


class QuestDBSection(_Section):
    host: str = "questdb"
    port: int = 9000  # HTTP: SQL and ILP-over-HTTP
    pg_port: int = 8812
    ilp_port: int = 9009
    user: str | None = None
    password: str | None = None
    tls: bool = False


class ClickHouseSection(_Section):
    host: str = "clickhouse"
    port: int = 8123
    database: str = "posttrade"
    user: str | None = None
    password: str | None = None
    secure: bool = False
    # `chdb:///path`: the embedded engine instead of a server (one data path per process).
    dsn: str | None = None


class DatabasesSection(_Section):
    questdb: QuestDBSection | None = None
    clickhouse: ClickHouseSection | None = None


class SeaweedFSSection(_Section):
    endpoint: str = "http://seaweedfs:8333"
    bucket: str = "trader2025"
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"


class StorageSection(_Section):
    seaweedfs: SeaweedFSSection | None = None
    local_dir: str | None = None  # used instead of object storage when set


class RedisSection(_Section):
    host: str = "valkey"
    port: int = 6379
    db: int = 0
    ttl: int = 300
    username: str | None = None
    password: str | None = None
    ssl: bool = False


class CacheSection(_Section):
    redis: RedisSection | None = None


class BatchSection(_Section):
    """How sinks batch and retry (`posttrade.sinks`): up to `size` items or `interval_sec`
    a batch; a write a store does not take is tried `max_retry` times a cycle, the pauses
    doubling from `retry_initial_s` up to `retry_max_s`, cycles going on until it answers."""

    size: int = 1000
    interval_sec: float = 1.0
    max_retry: int = 3
    retry_initial_s: float = 0.25
    retry_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.size < 1 or self.interval_sec <= 0 or self.max_retry < 1:
            raise ValueError("batch: size >= 1, interval_sec > 0 and max_retry >= 1")
        if self.retry_initial_s <= 0 or self.retry_max_s < self.retry_initial_s:
            raise ValueError("batch: retry_initial_s > 0 and retry_max_s >= retry_initial_s")


class RuntimeSection(_Section):
    """How agents consume: batch size, in-flight bound, and what /health calls unhealthy
    (lag, crash loops) or degraded (too many dead letters)."""

    batch_size: int = 1000
    max_ack_pending: int = 20_000
    ack_wait_s: float = 60.0
    max_lag: int = 100_000
    poison_attempts: int = 3  # an event that crashes its agent this often is dead-lettered
    # Where a *new* durable consumer starts when its agent does not say: "all" the
    # stream's history (what positions need), or only "new" messages.
    start_from: Literal["all", "new"] = "all"
    # The window /health looks back over, for both of the following.
    health_window_s: float = 300.0
    # An agent that crashed this often within the window, with no progress (a commit, or
    # an idle poll) since the first of those crashes, is crash-looping: /health 503.
    # Above poison_attempts, so that one poison message (dead-lettered after that many
    # crashes) is not taken for a loop.
    crash_loop_crashes: int = 5
    # Dead letters (and terminated messages) a minute, per agent, averaged over the
    # window, above which /health answers 200 with "status": "degraded".
    dead_letter_rate_limit: float = 10.0

    def __post_init__(self) -> None:
        if self.health_window_s <= 0:
            raise ValueError("runtime.health_window_s must be positive")
        if self.poison_attempts < 1:
            raise ValueError("runtime.poison_attempts must be at least 1")


class DeadLetterSection(_Section):
    """The limits of the dead-letter stream (`DLQ`, shared by every service: give them
    all the same). At a limit the oldest dead letters go; applied to an existing stream
    at each start."""

    max_age_s: float = 7 * 24 * 3600.0  # 7 days
    max_bytes: int = 1024**3  # 1 GiB

    def __post_init__(self) -> None:
        if self.max_age_s <= 0 or self.max_bytes <= 0:
            raise ValueError("dead_letter.max_age_s and dead_letter.max_bytes must be positive")


class DashboardSection(_Section):
    # Where each service's page is, for the pages' navigation bar: service -> URL
    # (`POSTTRADE__DASHBOARD__LINKS__PNL=http://desk-host:8100`). A service not listed
    # is on the page's own host, at the port its config file gives.
    links: dict[str, str] = msgspec.field(default_factory=dict)


class ServiceConfig(_Section):
    """The sections every service shares; services subclass it with their own."""

    service: ServiceSection
    nats: NatsSection = msgspec.field(default_factory=NatsSection)
    databases: DatabasesSection = msgspec.field(default_factory=DatabasesSection)
    storage: StorageSection = msgspec.field(default_factory=StorageSection)
    cache: CacheSection = msgspec.field(default_factory=CacheSection)
    batch: BatchSection = msgspec.field(default_factory=BatchSection)
    runtime: RuntimeSection = msgspec.field(default_factory=RuntimeSection)
    dead_letter: DeadLetterSection = msgspec.field(default_factory=DeadLetterSection)
    dashboard: DashboardSection = msgspec.field(default_factory=DashboardSection)
    # The reference data every service values money by (`core.reference`); None:
    # `reference.yaml` in the config folder, or the defaults when there is none.
    reference_file: str | None = None

    def reference(self) -> Reference:
        """The reference data, loaded and checked; a problem is a `ConfigError`."""
        try:
            return Reference.load(self.reference_file, default_config_dir() / REFERENCE_FILE)
        except ReferenceError as exc:
            raise ConfigError(f"reference data: {exc}") from None


C = TypeVar("C", bound=ServiceConfig)


def default_config_dir() -> Path:
    if "POSTTRADE_CONFIG_DIR" in os.environ:
        return Path(os.environ["POSTTRADE_CONFIG_DIR"])
    here = Path.cwd() / "config" / "backend"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent / "config" / "backend"


def _set_path(data: dict, path: list[str], value: Any, variable: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{variable}: `{part}` is not a section")
        node = child
    node[path[-1]] = value


def apply_env_overrides(data: dict, service: str, env: Mapping[str, str]) -> dict:
    generic = f"{ENV_PREFIX}__"
    specific = f"{ENV_PREFIX}_{service.upper()}__"
    # Generic first so that service-specific variables win.
    for prefix in (generic, specific):
        for variable in sorted(env):
            if not variable.startswith(prefix):
                continue
            path = [p.lower() for p in variable[len(prefix):].split("__")]
            if not all(path):
                raise ConfigError(f"{variable}: empty path segment")
            raw = env[variable]
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                value = raw
            if isinstance(value, dict):
                value = raw  # a variable sets one value (or a list), never a whole section
            _set_path(data, path, value, variable)
    return data


def load_config(
    service: str,
    schema: type[C] = ServiceConfig,
    *,
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> C:
    env = os.environ if env is None else env
    path = Path(path) if path else default_config_dir() / service / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{service}: no config file at {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    apply_env_overrides(data, service, env)
    try:
        return msgspec.convert(data, type=schema, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.databases.questdb.port`".
        message = str(exc)
        if " - at `$." in message:
            what, where = message.rsplit(" - at `$.", 1)
            raise ConfigError(f"{service} config, key `{where.rstrip('`')}`: {what}") from None
        raise ConfigError(f"{service} config: {message}") from None
