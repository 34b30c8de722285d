"""The image's HEALTHCHECK: GET /health of whichever service this container runs.

One image runs any of the six services (`posttrade worker <service>`), and Docker runs
this check as a separate process that is not told which one. So it finds out:

1. `POSTTRADE_SERVICE`, when set, names the service;
2. otherwise the `posttrade worker <service> [--config FILE]` command line is found
   among the container's processes (/proc/<pid>/cmdline).

The port is the one the service itself uses: its config file with the same environment
overrides (the check inherits the container's environment), `service.port`. Exit 0 when
/health answers 200, 1 otherwise; the first line of the answer is printed for
`docker inspect`.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import yaml

from posttrade.config import SERVICES, apply_env_overrides, default_config_dir

TIMEOUT_S = 4.0


class CheckError(RuntimeError):
    pass


def worker_of(argv: Sequence[str]) -> tuple[str, str | None] | None:
    """(service, config file or None) when `argv` runs `posttrade worker <service>`."""
    args = list(argv)
    for i, arg in enumerate(args[:-1]):
        if arg == "worker" and args[i + 1] in SERVICES:
            rest = args[i + 2 :]
            config = None
            for j, option in enumerate(rest):
                if option == "--config" and j + 1 < len(rest):
                    config = rest[j + 1]
                elif option.startswith("--config="):
                    config = option.split("=", 1)[1]
            return args[i + 1], config
    return None


def running_worker(proc: Path = Path("/proc")) -> tuple[str, str | None]:
    found = set()
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while we looked
        worker = worker_of([a.decode(errors="replace") for a in argv if a])
        if worker:
            found.add(worker)
    if len(found) != 1:
        raise CheckError(
            "no `posttrade worker <service>` process found" if not found
            else f"several workers in one container: {sorted(name for name, _ in found)}; set POSTTRADE_SERVICE"
        )
    return found.pop()


def service_port(service: str, config_file: str | None, env: dict[str, str]) -> int:
    """`service.port` as the service reads it: its YAML with the environment overrides.
    (Only the port is read: loading the service's whole schema would import it.)"""
    path = Path(config_file) if config_file else default_config_dir() / service / "config.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    apply_env_overrides(data, service, env)
    try:
        return int(data["service"]["port"])
    except (KeyError, TypeError, ValueError):
        raise CheckError(f"{path}: no valid service.port") from None


def service_token(service: str, config_file: str | None, env: dict[str, str]) -> str | None:
    """A token to read /health with (needed when service.protect_health is set): the
    read-only one, else the full one; None when the service has neither."""
    path = Path(config_file) if config_file else default_config_dir() / service / "config.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    apply_env_overrides(data, service, env)
    section = data.get("service") or {}
    token = section.get("read_token") or section.get("auth_token")
    return str(token) if token else None


def probe(port: int, host: str = "127.0.0.1", token: str | None = None) -> tuple[bool, str]:
    url = f"http://{host}:{port}/health"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:  # 503: the body says which check failed
        body = exc.read(2000).decode(errors="replace")
        return False, f"{url}: {exc.code} {body}"
    except OSError as exc:
        return False, f"{url}: {exc}"


def main(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    try:
        if env.get("POSTTRADE_SERVICE"):
            service, config_file = env["POSTTRADE_SERVICE"], None
            if service not in SERVICES:
                raise CheckError(f"POSTTRADE_SERVICE={service!r} is not one of {', '.join(SERVICES)}")
        else:
            service, config_file = running_worker()
        healthy, said = probe(service_port(service, config_file, env), token=service_token(service, config_file, env))
    except (CheckError, OSError, yaml.YAMLError) as exc:
        print(f"unhealthy: {exc}")
        return 1
    print(f"{service} {'healthy' if healthy else 'unhealthy'}: {said}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
