"""Compose's one-shot job: create the object-storage buckets the services' configs name.

Reads every service's config exactly as the service does (file + environment
overrides), and for each distinct (endpoint, bucket) of `storage.seaweedfs` — skipped
when `storage.local_dir` is set — creates the bucket if it is missing and writes and
removes a probe object, retrying while the S3 gateway is still starting: SeaweedFS
answers its health check and lists buckets some seconds before a write gets through.
The services would create the bucket on their first write too; doing it here makes a
fresh stack complete and writable before anything is written, and a wrong endpoint or
credential fails loudly, once, at `docker compose up`.
"""

from __future__ import annotations

import sys
import time

from posttrade.config import SERVICES, ConfigError, ServiceConfig, load_config
from posttrade.services import service_module
from posttrade.services.wiring import object_store

DEADLINE_S = 120.0
PROBE_OBJECT = "posttrade-stack/health-probe"


def wanted_buckets() -> dict[tuple[str, str], ServiceConfig]:
    """(endpoint, bucket) → the config of the first service that names it."""
    wanted: dict[tuple[str, str], ServiceConfig] = {}
    for name in SERVICES:
        config = load_config(name, service_module(name).CONFIG)
        s3 = config.storage.seaweedfs
        if s3 is None or config.storage.local_dir:
            continue
        wanted.setdefault((s3.endpoint, s3.bucket), config)
    return wanted


def main() -> int:
    try:
        wanted = wanted_buckets()
    except (ConfigError, LookupError) as exc:
        print(f"create_buckets: {exc}", file=sys.stderr)
        return 2
    for (endpoint, bucket), config in wanted.items():
        store = object_store(config)
        deadline = time.monotonic() + DEADLINE_S
        delay = 0.5
        while True:
            try:
                store.ensure_bucket_sync()
                store.put_sync(PROBE_OBJECT, b"ok", "text/plain")
                store.delete_sync(PROBE_OBJECT)
                break
            except Exception as exc:  # noqa: BLE001 - botocore raises many kinds while the gateway starts
                if time.monotonic() > deadline:
                    print(f"create_buckets: {endpoint}/{bucket}: {exc}", file=sys.stderr)
                    return 1
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        print(f"bucket ready and writable: {endpoint}/{bucket}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
