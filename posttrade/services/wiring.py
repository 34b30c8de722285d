"""Config → clients: the one place that turns config sections into connections."""

from __future__ import annotations

from ..app import App, RuntimeSettings
from ..config import ServiceConfig
from ..streams.nats import NatsTransport
from ..streams.transport import Transport
from ..web.dashboard import install_dashboard


def nats_transport(config: ServiceConfig) -> NatsTransport:
    nats = config.nats
    return NatsTransport(
        nats.url,
        name=f"posttrade-{config.service.name}",
        user=nats.user,
        password=nats.password,
        token=nats.token,
        creds_file=nats.creds_file,
        tls=nats.tls.context() if nats.tls else None,
        replicas=nats.replicas,
    )


def new_app(config: ServiceConfig, transport: Transport | None = None) -> App:
    """An App with the runtime settings and namespace of `config`, serving its page at
    `/`: on NATS as configured, or on `transport` (tests: the memory transport)."""
    app = App(
        config.service.name,
        transport or nats_transport(config),
        RuntimeSettings.from_config(config),
        namespace=config.service.namespace,
    )
    install_dashboard(app, config)
    return app


def chdb_dsn_for(dsn: str | None, service: str) -> str | None:
    """Give each service its own embedded ClickHouse directory.

    chdb allows one data path per process and one process per path, so a shared
    `chdb:///root` (what `posttrade stack env` sets) becomes `chdb:///root/<service>`.
    A server DSN (or None: host/port from config) is returned unchanged.
    """
    if dsn is None or not dsn.startswith("chdb://") or dsn.startswith("chdb://memory"):
        return dsn
    path, sep, query = dsn.partition("?")
    path = path.rstrip("/")
    if not path.endswith("/" + service):
        path = f"{path}/{service}"
    return path + sep + query


def clickhouse_store(config: ServiceConfig):
    """The service's ClickHouse: embedded chdb (own directory) or the configured server."""
    from ..stores.clickhouse import open_clickhouse

    ch = config.databases.clickhouse
    dsn = chdb_dsn_for(ch.dsn, config.service.name)
    if dsn and dsn.startswith("chdb:"):
        return open_clickhouse(dsn, database=ch.database, create_database=True)
    return open_clickhouse(
        dsn,
        host=None if dsn else ch.host,
        port=ch.port,
        user=ch.user,
        password=ch.password,
        database=ch.database,
        secure=ch.secure,
    )


def object_store(config: ServiceConfig):
    """Reports and exports go to S3-compatible storage, or a local directory when
    `storage.local_dir` is set (local runs) or no endpoint is configured."""
    from ..stores.objects import open_object_store

    storage = config.storage
    if storage.local_dir or storage.seaweedfs is None:
        return open_object_store(local_dir=storage.local_dir or "objects")
    s3 = storage.seaweedfs
    return open_object_store(
        endpoint=s3.endpoint,
        bucket=s3.bucket,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
    )
