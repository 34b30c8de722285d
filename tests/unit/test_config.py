from pathlib import Path

import pytest

from posttrade.config import SERVICES, ConfigError, ServiceConfig, load_config
from posttrade.services import service_module

SPEC_PORTS = {
    "ptrc": 8109,
    "pnl": 8100,
    "hot_cache": 8088,
    "questdb_writer": 8090,
    "feast_pipeline": 8104,
    "execution_quality": 8096,
}


def schema_of(service: str) -> type[ServiceConfig]:
    """The service's own schema (its extra sections), or the shared one if not built yet."""
    try:
        return service_module(service).CONFIG
    except LookupError:
        return ServiceConfig


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_config_loads_with_spec_shapes(service):
    config = load_config(service, schema_of(service), env={})
    assert config.service.name == service
    assert config.service.port == SPEC_PORTS[service]
    assert config.nats.url == "nats://nats:4222"
    assert config.databases.questdb.host == "questdb" and config.databases.questdb.port == 9000
    assert config.databases.clickhouse.host == "clickhouse" and config.databases.clickhouse.port == 8123
    assert config.storage.seaweedfs.endpoint == "http://seaweedfs:8333"
    assert config.storage.seaweedfs.bucket == "trader2025"
    assert (config.cache.redis.host, config.cache.redis.port, config.cache.redis.db, config.cache.redis.ttl) == (
        "valkey",
        6379,
        4,
        300,
    )
    # questdb_writer ships a larger batch (measured faster, see docs/questdb_writer.md).
    expected_size = 10_000 if service == "questdb_writer" else 1000
    assert (config.batch.size, config.batch.interval_sec, config.batch.max_retry) == (expected_size, 1, 3)


def test_ptrc_has_its_metrics_port():
    assert load_config("ptrc", schema_of("ptrc"), env={}).service.metrics_port == 9109


def test_nats_replicas_reach_the_transport_that_creates_the_streams():
    from posttrade.services.wiring import nats_transport

    config = load_config("ptrc", schema_of("ptrc"), env={"POSTTRADE__NATS__REPLICAS": "3"})
    assert nats_transport(config).replicas == 3
    assert nats_transport(load_config("ptrc", schema_of("ptrc"), env={})).replicas == 1


def test_environment_overrides_generic_then_service_specific():
    env = {
        "POSTTRADE__DATABASES__QUESTDB__HOST": "127.0.0.1",
        "POSTTRADE__DATABASES__QUESTDB__PORT": "19000",
        "POSTTRADE__NATS__PASSWORD": "s3cret",
        "POSTTRADE__SERVICE__PORT": "1",
        "POSTTRADE_PNL__SERVICE__PORT": "18100",
        "POSTTRADE_PTRC__SERVICE__PORT": "99",  # another service's: ignored
    }
    config = load_config("pnl", schema_of("pnl"), env=env)
    assert config.databases.questdb.host == "127.0.0.1"
    assert config.databases.questdb.port == 19000
    assert config.nats.password == "s3cret"
    assert config.service.port == 18100


def test_wrong_value_names_the_key():
    with pytest.raises(ConfigError, match=r"databases\.questdb\.port"):
        load_config("pnl", schema_of("pnl"), env={"POSTTRADE__DATABASES__QUESTDB__PORT": "not-a-port"})


def test_unknown_key_is_refused(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("service: {name: x, port: 1}\nbatch: {sise: 10}\n")
    with pytest.raises(ConfigError, match=r"batch.*sise|sise.*batch"):
        load_config("x", path=path, env={})


def test_missing_required_value_names_the_key(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("service: {name: x}\n")
    with pytest.raises(ConfigError, match="port"):
        load_config("x", path=path, env={})


def test_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no config file"):
        load_config("nope", path=tmp_path / "missing.yaml", env={})
