"""Config → clients: the one place that turns config sections into connections."""

from __future__ import annotations

from ..app import App, RuntimeSettings
from ..config import ServiceConfig
from ..streams.nats import NatsTransport


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
    )


def new_app(config: ServiceConfig) -> App:
    """An App on NATS with the runtime settings of `config`."""
    r = config.runtime
    runtime = RuntimeSettings(
        batch_size=r.batch_size,
        max_ack_pending=r.max_ack_pending,
        ack_wait_s=r.ack_wait_s,
        max_lag=r.max_lag,
        poison_attempts=r.poison_attempts,
    )
    return App(config.service.name, nats_transport(config), runtime)
