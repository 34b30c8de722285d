"""Object storage: one `ObjectStore` interface, a local directory or an S3-compatible bucket.

* `LocalObjectStore(root_dir)` — files under a directory. A `put` is atomic (a temp
  file in the same directory, fsync'd, then renamed over the target): readers see the
  old object or the new one, never half of one.
* `S3ObjectStore(endpoint=..., bucket=..., access_key=..., secret_key=..., region=...)` —
  boto3 with path-style addressing (SeaweedFS, MinIO); creates the bucket if missing.
* `open_object_store(endpoint=None, bucket=None, local_dir=None, ...)` — S3 when an
  endpoint is configured, else the local directory.

Names are `/`-separated keys such as `reports/2024-05-01/pnl.csv`. Both stores accept
the same names: non-empty components, none of them `.`/`..` or starting with `.`
(reserved for the local store's temp files), no backslash, NUL or leading `/`, so a
name can never escape the local root. `list(prefix)` matches a plain string prefix,
like S3, and returns names in lexicographic order.

Threading scheme (the same in every module of `posttrade.stores`): public I/O methods
are `async`; each has a `<name>_sync` twin that blocks and is safe to call from any
thread (boto3 clients are thread-safe; the local store relies on atomic renames), and
the async method is `await asyncio.to_thread(self.<name>_sync, ...)`.

Unlike S3, a directory cannot be a file: the local store refuses `a/b` when `a` is an
object and vice versa (ValueError). The local store does not keep content types (`put` accepts one for interface parity);
serve files with a type guessed from the extension (`mimetypes.guess_type`).
Credentials are used only when given: an S3 store without keys sends unsigned
(anonymous) requests, which SeaweedFS accepts only when it runs without an identity
config (the local stack's and the compose file's SeaweedFS have one, and refuse them).
"""

from __future__ import annotations

import abc
import asyncio
import datetime as _dt
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectStore",
    "LocalObjectStore",
    "S3ObjectStore",
    "open_object_store",
    "check_object_name",
]


class ObjectNotFoundError(LookupError):
    """No object by that name."""


@dataclass(frozen=True)
class ObjectInfo:
    name: str
    size: int
    last_modified: _dt.datetime  # timezone-aware, UTC


def check_object_name(name: str) -> str:
    """Return `name` if it is a valid object name (see the module doc), else raise ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError("object name must be a non-empty string")
    if name.startswith("/") or "\\" in name or "\x00" in name:
        raise ValueError(f"bad object name {name!r}: no leading '/', backslash or NUL")
    for part in name.split("/"):
        if not part or part.startswith("."):
            raise ValueError(
                f"bad object name {name!r}: components must be non-empty and not start with '.'"
            )
    if len(name.encode()) > 1024:
        raise ValueError("object name longer than 1024 bytes")
    return name


class ObjectStore(abc.ABC):
    """put / get / list / exists / delete by name; async methods over blocking `_sync` ones."""

    location: str

    @abc.abstractmethod
    def put_sync(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...

    @abc.abstractmethod
    def get_sync(self, name: str) -> bytes:
        """The object's bytes; raises ObjectNotFoundError."""

    @abc.abstractmethod
    def list_sync(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose name starts with `prefix`, sorted by name."""

    @abc.abstractmethod
    def exists_sync(self, name: str) -> bool: ...

    @abc.abstractmethod
    def delete_sync(self, name: str) -> None:
        """Remove the object; no error if it does not exist."""

    @abc.abstractmethod
    def ping_sync(self) -> bool:
        """True when the store is usable; raises otherwise."""

    def close_sync(self) -> None:
        return None

    async def put(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await asyncio.to_thread(self.put_sync, name, data, content_type)

    async def get(self, name: str) -> bytes:
        return await asyncio.to_thread(self.get_sync, name)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        return await asyncio.to_thread(self.list_sync, prefix)

    async def exists(self, name: str) -> bool:
        return await asyncio.to_thread(self.exists_sync, name)

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.delete_sync, name)

    async def ping(self) -> bool:
        return await asyncio.to_thread(self.ping_sync)

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)


class LocalObjectStore(ObjectStore):
    """Objects as files under `root_dir` (created if missing)."""

    def __init__(self, root_dir: str | os.PathLike[str]):
        self.root = Path(root_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def _path(self, name: str) -> Path:
        check_object_name(name)
        path = self.root.joinpath(*name.split("/"))
        # The name rules already forbid '..'; this also catches a symlink inside the
        # root that points outside it.
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ValueError(f"object name {name!r} escapes the store root")
        return path

    def put_sync(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ValueError(f"object name {name!r} runs through an existing object") from None
        if path.is_dir():
            raise ValueError(f"object name {name!r} is a prefix of other objects")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(path.parent)

    def get_sync(self, name: str) -> bytes:
        path = self._path(name)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(name) from None

    def exists_sync(self, name: str) -> bool:
        return self._path(name).is_file()

    def delete_sync(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return

    def list_sync(self, prefix: str = "") -> list[ObjectInfo]:
        if "\\" in prefix or "\x00" in prefix or prefix.startswith("/"):
            raise ValueError(f"bad prefix {prefix!r}")
        # Walk only the directory the prefix pins down, e.g. 'reports/2024-' → reports/.
        directory, _, _ = prefix.rpartition("/")
        start = self.root
        if directory:
            parts = directory.split("/")
            if any(not p or p.startswith(".") for p in parts):
                return []
            start = self.root.joinpath(*parts)
        if not start.is_dir():
            return []
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                if filename.startswith("."):
                    continue  # temp files of puts in progress
                name = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                if not name.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, filename))
                except FileNotFoundError:
                    continue  # deleted meanwhile
                found.append(
                    ObjectInfo(
                        name=name,
                        size=st.st_size,
                        last_modified=_dt.datetime.fromtimestamp(st.st_mtime, tz=_dt.timezone.utc),
                    )
                )
        found.sort(key=lambda info: info.name)
        return found

    def ping_sync(self) -> bool:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK):
            raise OSError(f"object store root {self.root} is not a writable directory")
        return True


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class S3ObjectStore(ObjectStore):
    """Objects in one bucket of an S3-compatible endpoint (path-style addressing)."""

    def __init__(
        self,
        *,
        endpoint: str,
        bucket: str,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        verify: bool | str = True,
        create_bucket: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        list_page_size: int = 1000,
    ):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        if (access_key is None) != (secret_key is None):
            raise ValueError("access_key and secret_key go together")
        if not bucket:
            raise ValueError("an S3 object store needs a bucket")
        config = Config(
            s3={"addressing_style": "path"},
            signature_version=UNSIGNED if access_key is None else "s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
        )
        # A session per store: boto3 clients are thread-safe, sessions are not.
        session = boto3.session.Session()
        self._s3 = session.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            verify=verify,
            config=config,
        )
        self.bucket = bucket
        self.region = region
        self.location = f"{endpoint.rstrip('/')}/{bucket}"
        self._create_bucket = create_bucket
        self._list_page_size = list_page_size  # keys per ListObjectsV2 request (S3's maximum: 1000)
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def ensure_bucket_sync(self) -> None:
        """Create the bucket if it does not exist (once per store)."""
        if self._bucket_ready:
            return
        from botocore.exceptions import ClientError

        with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                self._s3.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if self._code(exc) not in ("404", "NoSuchBucket", "NotFound") or not self._create_bucket:
                    raise
                kwargs: dict[str, Any] = {"Bucket": self.bucket}
                if self.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                try:
                    self._s3.create_bucket(**kwargs)
                except ClientError as create_exc:
                    if self._code(create_exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_ready = True

    def put_sync(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        check_object_name(name)
        self.ensure_bucket_sync()
        self._s3.put_object(Bucket=self.bucket, Key=name, Body=bytes(data), ContentType=content_type)

    def get_sync(self, name: str) -> bytes:
        from botocore.exceptions import ClientError

        check_object_name(name)
        try:
            response = self._s3.get_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
                raise ObjectNotFoundError(name) from None
            raise
        with response["Body"] as body:
            return body.read()

    def exists_sync(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        check_object_name(name)
        try:
            self._s3.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if self._code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                return False
            raise
        return True

    def delete_sync(self, name: str) -> None:
        check_object_name(name)
        self._s3.delete_object(Bucket=self.bucket, Key=name)

    def list_sync(self, prefix: str = "") -> list[ObjectInfo]:
        from botocore.exceptions import ClientError

        found: list[ObjectInfo] = []
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self._list_page_size}
            )
            for page in pages:
                for item in page.get("Contents", []):
                    modified = item["LastModified"]
                    if modified.tzinfo is None:
                        modified = modified.replace(tzinfo=_dt.timezone.utc)
                    found.append(ObjectInfo(name=item["Key"], size=int(item["Size"]), last_modified=modified))
        except ClientError as exc:
            if self._code(exc) == "NoSuchBucket":
                return []
            raise
        found.sort(key=lambda info: info.name)
        return found

    def ping_sync(self) -> bool:
        """Reaches the endpoint and makes sure the bucket exists."""
        self._bucket_ready = False
        self.ensure_bucket_sync()
        return True

    def close_sync(self) -> None:
        self._s3.close()


def open_object_store(
    endpoint: str | None = None,
    bucket: str | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us-east-1",
    verify: bool | str = True,
) -> ObjectStore:
    """S3 when `endpoint` is set (then `bucket` is required), else `local_dir`."""
    if endpoint:
        if not bucket:
            raise ValueError("an S3 endpoint needs a bucket")
        return S3ObjectStore(
            endpoint=endpoint,
            bucket=bucket,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            verify=verify,
        )
    if local_dir is None:
        raise ValueError("configure an object storage endpoint or a local directory")
    return LocalObjectStore(local_dir)
