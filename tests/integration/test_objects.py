"""posttrade.stores.objects against the local stack's real SeaweedFS (S3 gateway).

The stack's SeaweedFS refuses anonymous requests: these tests sign theirs with the
identity the stack generated for its home, the one `posttrade stack env` hands the
services. Each test writes under a prefix (or into a bucket) of its own and removes it,
so reruns and other tests' objects never meet. Last, ptrc itself, started with the
stack's environment as `make up` starts it, writes a day's reports into the bucket and
serves the list and the files from there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import uuid
from collections.abc import Iterator

import httpx
import pytest
from botocore.exceptions import ClientError

from posttrade import stack as local_stack
from posttrade.stores.objects import ObjectNotFoundError, S3ObjectStore, open_object_store

from .service_process import ServiceProcess


def signed_store(stack: local_stack.Endpoints, bucket: str = local_stack.SEAWEEDFS_BUCKET, **kwargs) -> S3ObjectStore:
    access_key, secret_key = stack.seaweedfs_credentials()
    return S3ObjectStore(
        endpoint=stack.seaweedfs_url, bucket=bucket, access_key=access_key, secret_key=secret_key, **kwargs
    )


def remove_prefix(store: S3ObjectStore, prefix: str) -> None:
    for info in store.list_sync(prefix):
        store.delete_sync(info.name)


def calls(store: S3ObjectStore, operation: str) -> list[dict]:
    """The requests of `operation` this store's client sends from now on (their parameters)."""
    seen: list[dict] = []
    store._s3.meta.events.register(f"provide-client-params.s3.{operation}", lambda params, **_: seen.append(params))
    return seen


@pytest.fixture
def prefix() -> str:
    return f"it-objects-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def store(stack: local_stack.Endpoints, prefix: str) -> Iterator[S3ObjectStore]:
    store = signed_store(stack)
    yield store
    remove_prefix(store, prefix)
    store.close_sync()


def test_the_stack_hands_the_services_its_seaweedfs_and_identity(stack: local_stack.Endpoints) -> None:
    env = stack.service_env()
    access_key, secret_key = stack.seaweedfs_credentials()
    assert env["POSTTRADE__STORAGE__SEAWEEDFS__ENDPOINT"] == f"http://127.0.0.1:{stack.seaweedfs_s3_port}"
    assert env["POSTTRADE__STORAGE__SEAWEEDFS__BUCKET"] == "trader2025"
    assert (env["POSTTRADE__STORAGE__SEAWEEDFS__ACCESS_KEY"], env["POSTTRADE__STORAGE__SEAWEEDFS__SECRET_KEY"]) == (
        access_key, secret_key)
    assert "POSTTRADE__STORAGE__LOCAL_DIR" not in env
    # The secret stays with its owner: the identity file is not readable by others.
    assert stack.seaweedfs_identity_file.stat().st_mode & 0o077 == 0


def test_put_get_list_exists_and_delete(store: S3ObjectStore, prefix: str) -> None:
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    store.put_sync(f"{prefix}b/2.csv", b"x,y\n1,2\n", "text/csv")
    store.put_sync(f"{prefix}a.txt", bytearray(b"first"))
    store.put_sync(f"{prefix}a.txt", b"second")  # an overwrite
    store.put_sync(f"{prefix}b/1.parquet", b"\x00" * 3, "application/vnd.apache.parquet")
    store.put_sync(f"{prefix}ba", b"")

    assert store.get_sync(f"{prefix}a.txt") == b"second"
    assert store.get_sync(f"{prefix}b/2.csv") == b"x,y\n1,2\n"
    assert store.get_sync(f"{prefix}ba") == b""
    content_type = store._s3.head_object(Bucket=store.bucket, Key=f"{prefix}b/2.csv")["ContentType"]
    assert content_type == "text/csv"

    listed = store.list_sync(prefix)
    assert [(i.name, i.size) for i in listed] == [
        (f"{prefix}a.txt", 6), (f"{prefix}b/1.parquet", 3), (f"{prefix}b/2.csv", 8), (f"{prefix}ba", 0)]
    assert all(i.last_modified.tzinfo is not None and i.last_modified >= before for i in listed)
    # A plain string prefix, as S3 has it: "b" matches the folder b/ and the object ba.
    under_b = [f"{prefix}b/1.parquet", f"{prefix}b/2.csv", f"{prefix}ba"]
    assert [i.name for i in store.list_sync(f"{prefix}b")] == under_b
    assert store.list_sync(f"{prefix}zzz") == []

    assert store.exists_sync(f"{prefix}a.txt") and not store.exists_sync(f"{prefix}b")
    store.delete_sync(f"{prefix}a.txt")
    store.delete_sync(f"{prefix}a.txt")  # gone already: no error
    assert not store.exists_sync(f"{prefix}a.txt")
    with pytest.raises(ObjectNotFoundError):
        store.get_sync(f"{prefix}a.txt")
    with pytest.raises(ValueError):
        store.put_sync(f"{prefix}../escape", b"1")
    assert [i.name for i in store.list_sync(prefix)] == under_b


async def test_the_async_methods_and_ping(store: S3ObjectStore, prefix: str) -> None:
    await store.put(f"{prefix}async.bin", b"\x01\x02")
    assert await store.get(f"{prefix}async.bin") == b"\x01\x02"
    assert await store.exists(f"{prefix}async.bin")
    assert [i.name for i in await store.list(prefix)] == [f"{prefix}async.bin"]
    await store.delete(f"{prefix}async.bin")
    assert not await store.exists(f"{prefix}async.bin")
    assert await store.ping() is True


def test_a_list_longer_than_a_page_is_read_page_by_page(stack: local_stack.Endpoints, prefix: str) -> None:
    store = signed_store(stack, list_page_size=2)
    try:
        names = [f"{prefix}{i:02d}" for i in (4, 0, 3, 1, 2)]
        for name in names:
            store.put_sync(name, name.encode())
        requests = calls(store, "ListObjectsV2")
        assert [i.name for i in store.list_sync(prefix)] == sorted(names)
        assert len(requests) == 3 and all(r["MaxKeys"] == 2 for r in requests)
    finally:
        remove_prefix(store, prefix)
        store.close_sync()


def test_a_missing_bucket_reads_as_empty_and_the_first_put_creates_it_once(stack: local_stack.Endpoints) -> None:
    bucket = f"it-objects-{uuid.uuid4().hex[:12]}"
    store = signed_store(stack, bucket=bucket)
    try:
        assert store.list_sync() == []
        assert not store.exists_sync("r/a.csv")
        with pytest.raises(ObjectNotFoundError):
            store.get_sync("r/a.csv")
        creates = calls(store, "CreateBucket")
        store.put_sync("r/a.csv", b"1,2", "text/csv")
        store.put_sync("r/b.csv", b"3", "text/csv")
        assert [(i.name, i.size) for i in store.list_sync("r/")] == [("r/a.csv", 3), ("r/b.csv", 1)]
        assert len(creates) == 1
        # A second store finds the bucket there and creates nothing.
        again = signed_store(stack, bucket=bucket)
        again_creates = calls(again, "CreateBucket")
        again.put_sync("r/c.csv", b"4")
        assert again_creates == [] and again.get_sync("r/a.csv") == b"1,2"
        again.close_sync()
    finally:
        remove_prefix(store, "")
        store._s3.delete_bucket(Bucket=bucket)
        store.close_sync()


def test_a_large_object_round_trips_whole(store: S3ObjectStore, prefix: str) -> None:
    # Larger than the filer's 4 MB chunks: SeaweedFS stores it in pieces and joins them.
    data = os.urandom(24 * 1024 * 1024 + 123)
    store.put_sync(f"{prefix}large.bin", data)
    [info] = store.list_sync(prefix)
    assert info.size == len(data)
    got = store.get_sync(f"{prefix}large.bin")
    assert len(got) == len(data) and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_anonymous_and_wrongly_signed_requests_are_refused(stack: local_stack.Endpoints, store, prefix) -> None:
    store.put_sync(f"{prefix}secret.csv", b"a,b\n")
    access_key, secret_key = stack.seaweedfs_credentials()
    anonymous = open_object_store(endpoint=stack.seaweedfs_url, bucket=store.bucket)  # unsigned requests
    wrong_secret = S3ObjectStore(endpoint=stack.seaweedfs_url, bucket=store.bucket, access_key=access_key,
                                 secret_key=secret_key + "x")  # fmt: skip
    unknown_key = S3ObjectStore(endpoint=stack.seaweedfs_url, bucket=store.bucket, access_key="PTNOSUCHKEY",
                                secret_key=secret_key)  # fmt: skip
    refusals = {"anonymous": {"AccessDenied"}, "wrong secret": {"SignatureDoesNotMatch"},
                "unknown key": {"InvalidAccessKeyId", "AccessDenied"}}  # fmt: skip
    for who, intruder in (("anonymous", anonymous), ("wrong secret", wrong_secret), ("unknown key", unknown_key)):
        for attempt in (
            lambda: intruder.get_sync(f"{prefix}secret.csv"),
            lambda: intruder.list_sync(prefix),
            lambda: intruder.put_sync(f"{prefix}planted.csv", b"x"),
            lambda: intruder.delete_sync(f"{prefix}secret.csv"),
        ):
            with pytest.raises(ClientError) as refused:
                attempt()
            answer = refused.value.response
            # A put asks HEAD bucket first, whose refusal has no body to name an error code.
            assert answer["ResponseMetadata"]["HTTPStatusCode"] == 403, (who, answer)
            assert answer["Error"]["Code"] in refusals[who] | {"403"}, (who, answer["Error"])
        intruder.close_sync()
    assert [i.name for i in store.list_sync(prefix)] == [f"{prefix}secret.csv"]
    assert store.get_sync(f"{prefix}secret.csv") == b"a,b\n"


def test_ptrc_writes_its_reports_to_seaweedfs_and_serves_them_from_there(stack, tmp_path) -> None:
    reports_prefix = f"it-reports-{uuid.uuid4().hex[:12]}"
    # Only the stack's environment and a prefix of this test's own: ptrc finds SeaweedFS,
    # its bucket and its identity the way `make up` gives them to it.
    ptrc = ServiceProcess("ptrc", stack, tmp_path, env={"POSTTRADE_PTRC__REPORTS__PREFIX": reports_prefix})
    bucket = signed_store(stack)
    ptrc.start()
    try:
        health = ptrc.get("/health").json()
        location = f"{stack.seaweedfs_url}/trader2025"
        assert any(c["ok"] and c.get("detail") == location for c in health["checks"].values()), health
        # The reports from QuestDB and ptrc's own table (the compliance report's ClickHouse
        # is no part of object storage).
        kinds = ["daily_pnl", "positions", "trade_blotter"]
        generated = ptrc.post("/reports", json={"kinds": kinds})
        assert generated.status_code == 201, generated.text
        day = generated.json()["date"]
        written = {r["name"] for r in generated.json()["reports"]}
        assert written == {f"{day}/{kind}.{fmt}" for kind in kinds for fmt in ("csv", "parquet")}

        listed = ptrc.get("/reports", date=day).json()["reports"]
        stored = {info.name: info for info in bucket.list_sync(f"{reports_prefix}/")}
        assert {r["name"] for r in listed} == written
        assert set(stored) == {f"{reports_prefix}/{name}" for name in written}
        for report in listed:
            name = f"{reports_prefix}/{report['name']}"
            assert report["size"] == stored[name].size
            download = httpx.get(f"{ptrc.url}{report['url']}", timeout=30)
            assert download.status_code == 200
            assert download.content == bucket.get_sync(name)
        # Gone from the bucket, gone from ptrc: it keeps no copy of its own.
        gone = f"{day}/positions.csv"
        bucket.delete_sync(f"{reports_prefix}/{gone}")
        assert ptrc.get(f"/reports/{gone}").status_code == 404
        assert gone not in {r["name"] for r in ptrc.get("/reports", date=day).json()["reports"]}
    finally:
        ptrc.stop()
        remove_prefix(bucket, f"{reports_prefix}/")
        bucket.close_sync()
