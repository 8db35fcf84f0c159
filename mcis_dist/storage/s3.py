"""A prefix in an S3 (or S3-compatible) bucket: :class:`S3Storage`, through boto3.

An object only becomes visible once its (possibly multipart) upload completes, so a write is
atomic. S3 access uses boto3's standard credential chain; no key is stored on these objects.

**Flaky object stores.** Real S3 answers 500/503 (``SlowDown``), resets connections and stalls
mid-read. Three layers absorb that:

* every request goes through botocore's retry handler, ``Config(retries={"mode": "standard"})``
  (or ``"adaptive"``, which also rate-limits the client on throttling answers): 500/502/503/504,
  ``SlowDown``/throttling codes, connection errors and read timeouts are retried with jittered
  exponential backoff, up to ``max_attempts`` attempts in all (first try included), with
  ``connect_timeout`` and ``read_timeout`` bounding each attempt (the knobs:
  :mod:`mcis_dist.storage.retry`). Writes are single PUTs or multipart uploads of a seekable
  file, which botocore rewinds and re-sends;
* a GET whose *body* dies halfway is resumed with a ranged GET pinned to the object's ETag, and
  a whole object read is checked against its stored CRC32 (:mod:`mcis_dist.storage.resumable`);
* ``download_file`` uses s3transfer, which retries broken bodies itself
  (``TransferConfig.num_download_attempts``, 5).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
)

from mcis_dist.storage.base import Staged, StorageError, _S3Location, _split_s3, _staging
from mcis_dist.storage.resumable import _ResumableBody
from mcis_dist.storage.retry import ENV_MAX_ATTEMPTS, ENV_READ_TIMEOUT, S3RetrySettings


def _transient(e: BaseException) -> bool:
    """A 5xx/throttling answer or a connection that broke after it was made (not: a refused
    connection, a missing bucket, a denied key)."""

    if isinstance(e, ClientError):
        meta = e.response.get("ResponseMetadata", {})
        code = str(e.response.get("Error", {}).get("Code", ""))
        return int(meta.get("HTTPStatusCode") or 0) >= 500 or code in ("SlowDown", "Throttling")
    return isinstance(e, HTTPClientError)


class S3Storage:
    """A prefix in an S3 (or S3-compatible) bucket, through boto3."""

    def __init__(self, url: str, endpoint_url: str | None = None, client=None):
        bucket, prefix = _split_s3(url)
        self.loc = _S3Location(bucket, prefix)
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._client = client
        self._retry: S3RetrySettings | None = None

    # boto3 clients are neither picklable nor fork-safe: build one lazily in each process.
    def __getstate__(self):
        return {"loc": self.loc, "endpoint_url": self.endpoint_url, "url": self.url}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._client = None
        self._retry = None  # the receiving process's environment decides

    @property
    def retry_settings(self) -> S3RetrySettings:
        """This process's retry settings (read from the environment once per storage)."""
        if self._retry is None:
            self._retry = S3RetrySettings.from_env()
        return self._retry

    def _make_client(self, attempts: int | None = None):
        import boto3  # lazy: S3 only

        s = self.retry_settings
        config = Config(
            retries={"total_max_attempts": attempts or s.max_attempts, "mode": s.mode},
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    @property
    def client(self):
        """For data: patient retries, since a long build must ride out transient S3 errors."""
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.loc.prefix}/{name}".strip("/") if self.loc.prefix else name

    def child(self, name: str) -> S3Storage:
        return S3Storage(f"{self.url}/{name}", self.endpoint_url, self._client)

    def describe(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def _error(self, e: Exception, what: str) -> StorageError:

        endpoint = f" at endpoint {self.endpoint_url}" if self.endpoint_url else ""
        if type(e).__name__ == "S3UploadFailedError" and e.__context__ is not None:
            e = e.__context__  # s3transfer's wrapper: the cause is the client's error
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
            retried = int(e.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0)
            tries = f" (after {retried + 1} attempts)" if retried else ""
            return StorageError(f"{what}: S3 error {code}{endpoint}{tries}")
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"{what}: cannot reach the S3 endpoint{endpoint or ''}")
        if isinstance(e, NoCredentialsError):
            return StorageError(
                f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or a profile)"
            )
        if isinstance(e, StorageError):
            return e
        if isinstance(e, HTTPClientError):  # reset, truncated or timed out on every attempt
            return StorageError(
                f"{what}: {type(e).__name__}{endpoint} (gave up after "
                f"{self.retry_settings.max_attempts} attempts; see {ENV_MAX_ATTEMPTS} and "
                f"{ENV_READ_TIMEOUT})"
            )
        return StorageError(f"{what}: {type(e).__name__}{endpoint}")

    def exists(self, name: str) -> bool:

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
        except Exception as e:
            raise self._error(e, f"cannot read {self.describe(name)}") from None
        with _ResumableBody(self, name, obj, start=offset) as body:
            return body.read()

    def list_dirs(self) -> list[str]:
        return sorted(n for n in self._list_page("", delimiter=True) if n)

    def read_bytes(self, name: str) -> bytes:
        with self.open_read(name) as body:
            return body.read()

    def open_read(self, name: str) -> BinaryIO:
        """A streaming read that resumes where it broke (see :class:`_ResumableBody`)."""
        try:
            obj = self.client.get_object(Bucket=self.loc.bucket, Key=self._key(name))
        except Exception as e:
            err = self._error(e, f"cannot read {self.describe(name)}")
            if "no such object" in str(err):
                err = StorageError(f"{self.describe(name)} does not exist")
            raise err from None
        return _ResumableBody(self, name, obj)

    def write_bytes(self, name: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.loc.bucket, Key=self._key(name), Body=data)
        except Exception as e:
            raise self._error(e, f"cannot write {self.describe(name)}") from None

    def upload_file(self, local_path: str | os.PathLike, name: str) -> None:
        """Upload (multipart above ``MCIS_S3_MULTIPART_MB``, 64 by default); the object is
        visible only once complete."""
        from boto3.s3.transfer import TransferConfig  # lazy: S3 only

        part = self.retry_settings.multipart_mb << 20
        cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
        key = self._key(name)
        try:
            self.client.upload_file(str(local_path), self.loc.bucket, key, Config=cfg)
        except Exception as e:
            raise self._error(e, f"cannot upload to {self.describe(name)}") from None
        if os.path.getsize(local_path) >= part:
            self._abort_orphans(key)

    def _abort_orphans(self, key: str) -> None:
        """Abort the unfinished multipart uploads left on ``key`` once the object is complete.

        A CreateMultipartUpload whose answer is lost (a reset connection) is retried and
        starts a second upload; the first stays open, unseen, and billed, until aborted. Any
        upload still open on the key now is such an orphan or a stale writer's, whose object
        this one supersedes. Best effort: a failure here leaves the (complete) object as it is.
        """
        try:
            listing = self.client.list_multipart_uploads(Bucket=self.loc.bucket, Prefix=key)
            for up in listing.get("Uploads", []):
                if up["Key"] == key:
                    self.client.abort_multipart_upload(
                        Bucket=self.loc.bucket, Key=key, UploadId=up["UploadId"]
                    )
        except Exception:  # the object is complete; an orphan costs storage, not correctness
            pass

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
        """Fail fast (two attempts, not eight) on a missing bucket, endpoint or credentials; a
        store that answers 5xx, resets or stalls is only flaky, and gets the patient client."""
        try:
            self._make_client(attempts=min(2, self.retry_settings.max_attempts)).head_bucket(
                Bucket=self.loc.bucket
            )
        except Exception as e:
            if not _transient(e):
                raise self._error(e, f"cannot read {self.url}") from None
            try:
                self.client.head_bucket(Bucket=self.loc.bucket)
            except Exception as e2:
                raise self._error(e2, f"cannot read {self.url}") from None

    def check_writable(self) -> None:
        """Fail fast (before any work) on a missing bucket, bad credentials or a read-only key."""
        self.check_readable()
        probe = ".mcis-write-check"
        self.write_bytes(probe, b"")
        self.delete(probe)
