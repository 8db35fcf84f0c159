"""One interface over the two places outputs live: a local folder or ``s3://bucket/prefix``.

Every stage writes its outputs through :func:`open_storage`, so the rest of the code never asks
which kind of URL it holds. Two promises matter more than the API:

* **Atomic writes.** A file (object) appears whole or not at all: locally through a temporary
  file in the same folder and ``os.replace``; on S3 because an object only becomes visible once
  its (possibly multipart) upload completes. Together with "write the manifest last", a
  half-written output never looks finished.
* **Credentials stay in the environment.** S3 access uses boto3's standard credential chain
  (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, profiles, instance
  roles); the endpoint may come from ``--endpoint-url`` or ``AWS_ENDPOINT_URL[_S3]``. No key is
  ever stored on these objects, written to a file, or put into an error message.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["StorageError", "LocalStorage", "S3Storage", "Storage", "open_storage", "is_s3_url"]


class StorageError(RuntimeError):
    """A storage URL cannot be used: missing, unreachable, access denied, or malformed."""


def is_s3_url(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url!r} is not a valid S3 URL: expected s3://bucket[/prefix]")
    return bucket, prefix.strip("/")


class Staged:
    """A local file being written for :meth:`LocalStorage.staged` / :meth:`S3Storage.staged`."""

    def __init__(self, path: Path):
        self.path = path
        self.discarded = False

    def discard(self) -> None:
        """Drop the file instead of publishing it."""
        self.discarded = True


@contextmanager
def _staging(folder: Path | None, prefix: str, publish) -> Iterator[Staged]:
    """A temporary file in ``folder`` (None: the system's), published by ``publish(path)`` if the
    block ends without error and the file was not discarded; removed in every case."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    os.close(fd)
    staged = Staged(Path(tmp))
    try:
        yield staged
        if not staged.discarded:
            publish(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


class LocalStorage:
    """A folder on local disk (created on the first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self._path(name))

    def describe(self, name: str = "") -> str:
        return str(self._path(name))

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files directly under ``prefix`` (a folder), sorted."""
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_file())

    def sizes(self) -> dict[str, int]:
        """Byte size of every file directly in this folder."""
        if not self.root.is_dir():
            raise StorageError(f"{self.root} does not exist or is not a folder")
        return {p.name: p.stat().st_size for p in self.root.iterdir() if p.is_file()}

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        with self.open_read(name) as f:
            f.seek(offset)
            return f.read(size)

    def list_dirs(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{self.describe(name)} does not exist") from None

    def open_read(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise StorageError(f"{self.describe(name)} does not exist") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def upload_file(self, local_path: str | os.PathLike, name: str) -> None:
        """Put a local file under ``name`` atomically (copy to a temporary name, then rename)."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextmanager
    def staged(self, name: str) -> Iterator[Staged]:
        """Write a large file in place: a hidden temporary file in the destination folder,
        renamed over ``name`` when the block ends without error (no copy, still atomic)."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _staging(path.parent, f".{path.name}.", lambda tmp: os.replace(tmp, path)) as st:
            yield st

    def download_file(self, name: str, local_path: str | os.PathLike) -> None:
        try:
            shutil.copyfile(self._path(name), local_path)
        except FileNotFoundError:
            raise StorageError(f"{self.describe(name)} does not exist") from None

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def check_writable(self) -> None:
        """Fail before any work starts if the folder cannot be created or written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".mcis-write-check"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"cannot write to {self.root}: {e.strerror or e}") from None

    def check_readable(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"{self.root} does not exist or is not a folder")


@dataclass(frozen=True)
class _S3Location:
    bucket: str
    prefix: str


class S3Storage:
    """A prefix in an S3 (or S3-compatible) bucket, through boto3."""

    def __init__(self, url: str, endpoint_url: str | None = None, client=None):
        bucket, prefix = _split_s3(url)
        self.loc = _S3Location(bucket, prefix)
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = client

    # boto3 clients are neither picklable nor fork-safe: build one lazily in each process.
    def __getstate__(self):
        return {"loc": self.loc, "endpoint_url": self.endpoint_url, "url": self.url}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._client = None

    def _make_client(self, attempts: int):
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=10)
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    @property
    def client(self):
        """For data: patient retries, since a long build must ride out transient S3 errors."""
        if self._client is None:
            self._client = self._make_client(attempts=8)
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.loc.prefix}/{name}".strip("/") if self.loc.prefix else name

    def child(self, name: str) -> S3Storage:
        return S3Storage(f"{self.url}/{name}", self.endpoint_url, self._client)

    def describe(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def _error(self, e: Exception, what: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        endpoint = f" at endpoint {self.endpoint_url}" if self.endpoint_url else ""
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                return StorageError(f"{what}: bucket '{self.loc.bucket}' does not exist{endpoint}")
            if code in ("NoSuchKey",):
                return StorageError(f"{what}: no such object")
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(
                    f"{what}: access denied to bucket '{self.loc.bucket}'{endpoint} ({code}); "
                    "check the AWS credentials in the environment"
                )
            return StorageError(f"{what}: S3 error {code}{endpoint}")
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"{what}: cannot reach the S3 endpoint{endpoint or ''}")
        if isinstance(e, NoCredentialsError):
            return StorageError(
                f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or a profile)"
            )
        return StorageError(f"{what}: {type(e).__name__}{endpoint}")

    def exists(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.loc.bucket, Key=self._key(name))
            return True
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(e, f"cannot read {self.describe(name)}") from None
        except Exception as e:
            raise self._error(e, f"cannot read {self.describe(name)}") from None

    def _list_page(self, prefix: str, delimiter: bool):
        key_prefix = self._key(prefix)
        key_prefix = f"{key_prefix}/" if key_prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        kwargs = {"Bucket": self.loc.bucket, "Prefix": key_prefix, "Delimiter": "/"}
        try:
            for page in paginator.paginate(**kwargs):
                if delimiter:
                    for p in page.get("CommonPrefixes", []):
                        yield p["Prefix"][len(key_prefix) :].rstrip("/")
                else:
                    for obj in page.get("Contents", []):
                        yield obj["Key"][len(key_prefix) :]
        except Exception as e:
            raise self._error(e, f"cannot list {self.describe(prefix)}") from None

    def list(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._list_page(prefix, delimiter=False) if n)

    def sizes(self) -> dict[str, int]:
        """Byte size of every object directly under this prefix."""
        key_prefix = f"{self.loc.prefix}/" if self.loc.prefix else ""
        out = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.loc.bucket, Prefix=key_prefix, Delimiter="/"
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(key_prefix) :]] = int(obj["Size"])
        except Exception as e:
            raise self._error(e, f"cannot list {self.url}") from None
        return out

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (one ranged GET: random access into a shard)."""
        try:
            obj = self.client.get_object(
                Bucket=self.loc.bucket,
                Key=self._key(name),
                Range=f"bytes={offset}-{offset + size - 1}",
            )
            return obj["Body"].read()
        except Exception as e:
            raise self._error(e, f"cannot read {self.describe(name)}") from None

    def list_dirs(self) -> list[str]:
        return sorted(n for n in self._list_page("", delimiter=True) if n)

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as body:
            return body.read()

    def open_read(self, name: str) -> BinaryIO:
        try:
            obj = self.client.get_object(Bucket=self.loc.bucket, Key=self._key(name))
        except Exception as e:
            err = self._error(e, f"cannot read {self.describe(name)}")
            if "no such object" in str(err):
                err = StorageError(f"{self.describe(name)} does not exist")
            raise err from None
        return obj["Body"]

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.loc.bucket, Key=self._key(name), Body=data)
        except Exception as e:
            raise self._error(e, f"cannot write {self.describe(name)}") from None

    def upload_file(self, local_path: str | os.PathLike, name: str) -> None:
        """Upload (multipart above 64 MB); the object is visible only once complete."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)
        try:
            self.client.upload_file(str(local_path), self.loc.bucket, self._key(name), Config=cfg)
        except Exception as e:
            raise self._error(e, f"cannot upload to {self.describe(name)}") from None

    @contextmanager
    def staged(self, name: str) -> Iterator[Staged]:
        """Write a large file locally, then upload it when the block ends without error."""
        with _staging(None, "mcis-", lambda tmp: self.upload_file(tmp, name)) as st:
            yield st

    def download_file(self, name: str, local_path: str | os.PathLike) -> None:
        try:
            self.client.download_file(self.loc.bucket, self._key(name), str(local_path))
        except Exception as e:
            raise self._error(e, f"cannot download {self.describe(name)}") from None

    def delete(self, name: str) -> None:
        try:
            self.client.delete_object(Bucket=self.loc.bucket, Key=self._key(name))
        except Exception as e:
            raise self._error(e, f"cannot delete {self.describe(name)}") from None

    def check_readable(self) -> None:
        """Fail fast (two attempts, not eight) on a missing bucket, endpoint or credentials."""
        try:
            self._make_client(attempts=2).head_bucket(Bucket=self.loc.bucket)
        except Exception as e:
            raise self._error(e, f"cannot read {self.url}") from None

    def check_writable(self) -> None:
        """Fail fast (before any work) on a missing bucket, bad credentials or a read-only key."""
        self.check_readable()
        probe = ".mcis-write-check"
        self.write_bytes(probe, b"")
        self.delete(probe)


Storage = LocalStorage | S3Storage


def open_storage(url: str | os.PathLike, endpoint_url: str | None = None) -> Storage:
    """The storage behind ``url``: ``s3://bucket/prefix`` or a local path."""
    url = str(url)
    if is_s3_url(url):
        return S3Storage(url, endpoint_url=endpoint_url)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise StorageError(
            f"unsupported storage URL {url!r}: scheme '{scheme}' (valid: a local path or s3://)"
        )
    return LocalStorage(url)


def open_url(url: str, endpoint_url: str | None = None) -> BinaryIO:
    """Open one file or object for streaming reads, e.g. a shard for webdataset::

    webdataset.gopen.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192: open_url(url)
    """
    parent, _, name = str(url).rstrip("/").rpartition("/")
    if not name or (is_s3_url(url) and parent in ("s3:/", "s3:")):
        raise StorageError(f"{url!r} does not name a file or object")
    return open_storage(parent, endpoint_url=endpoint_url).open_read(name)
