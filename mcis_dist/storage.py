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

**Flaky object stores.** Real S3 answers 500/503 (``SlowDown``), resets connections and stalls
mid-read. Three layers absorb that:

* every request goes through botocore's retry handler, ``Config(retries={"mode": "standard"})``
  (or ``"adaptive"``, which also rate-limits the client on throttling answers): 500/502/503/504,
  ``SlowDown``/throttling codes, connection errors and read timeouts are retried with jittered
  exponential backoff, up to ``max_attempts`` attempts in all (first try included), with
  ``connect_timeout`` and ``read_timeout`` bounding each attempt. Writes are single PUTs or
  multipart uploads of a seekable file, which botocore rewinds and re-sends;
* botocore's retries end when the answer's headers arrive, so a GET whose *body* dies halfway
  (reset, truncated, or silent for ``read_timeout``) is resumed here: :class:`_ResumableBody`
  re-requests the rest with ``Range: bytes=<next byte>-`` and ``If-Match: <ETag>`` (an object
  replaced meanwhile fails instead of splicing two versions), so the reader sees every byte once,
  in order. It gives up after ``max_attempts`` failures in a row without progress (or
  ``4 * max_attempts`` in all) with a :class:`StorageError` naming the ``s3://`` URL. A whole
  object read (in one piece or several) is checked against the CRC32 stored with it, when
  there is one; a mismatch raises :class:`StorageError` at the end of the read (a streaming reader has seen the bytes before it by then: ``read_bytes`` has not);
* ``download_file`` uses s3transfer, which retries broken bodies itself
  (``TransferConfig.num_download_attempts``, 5).

The knobs, read from the environment when a process creates its client (so they reach build
pool workers and Ray actors started on the same machine): ``MCIS_S3_MAX_ATTEMPTS`` (default 8),
``MCIS_S3_RETRY_MODE`` (``standard`` or ``adaptive``), ``MCIS_S3_CONNECT_TIMEOUT`` (seconds,
default 10) and ``MCIS_S3_READ_TIMEOUT`` (seconds without a byte before an attempt counts as
failed, default 60). ``check_readable`` uses at most 2 attempts, to fail fast on a wrong
endpoint, bucket or key; only if those end in a 5xx, a reset or a timeout does it retry with the
full ``max_attempts``.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from urllib3.exceptions import HTTPError as URLLib3Error

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


ENV_MAX_ATTEMPTS = "MCIS_S3_MAX_ATTEMPTS"
ENV_RETRY_MODE = "MCIS_S3_RETRY_MODE"
ENV_CONNECT_TIMEOUT = "MCIS_S3_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "MCIS_S3_READ_TIMEOUT"
RETRY_MODES = ("standard", "adaptive")


@dataclass(frozen=True)
class S3RetrySettings:
    """How hard an S3 client tries (see the module docstring); :meth:`from_env` reads the
    ``MCIS_S3_*`` variables."""

    max_attempts: int = 8
    mode: str = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0

    @classmethod
    def from_env(cls) -> S3RetrySettings:
        def number(var: str, kind, default, low):
            raw = os.environ.get(var, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or value < low:
                raise StorageError(f"{var}={raw!r}: expected a number >= {low}") from None
            return value

        mode = os.environ.get(ENV_RETRY_MODE, "").strip() or cls.mode
        if mode not in RETRY_MODES:
            raise StorageError(
                f"{ENV_RETRY_MODE}={mode!r}: expected one of {', '.join(RETRY_MODES)}"
            )
        return cls(
            max_attempts=number(ENV_MAX_ATTEMPTS, int, cls.max_attempts, 1),
            mode=mode,
            connect_timeout=number(ENV_CONNECT_TIMEOUT, float, cls.connect_timeout, 0.1),
            read_timeout=number(ENV_READ_TIMEOUT, float, cls.read_timeout, 0.1),
        )


@functools.cache
def _body_errors() -> tuple[type[BaseException], ...]:
    """What a GET body raises when its connection dies mid-read (worth resuming)."""

    # HTTPClientError: ResponseStreamingError (reset, truncated), ReadTimeoutError (a stall),
    # ConnectionClosedError; IncompleteReadError: fewer bytes than Content-Length.
    return (
        HTTPClientError,
        IncompleteReadError,
        BotoConnectionError,
        URLLib3Error,
        ConnectionError,
        TimeoutError,
    )


def _transient(e: BaseException) -> bool:
    """A 5xx/throttling answer or a connection that broke after it was made (not: a refused
    connection, a missing bucket, a denied key)."""

    if isinstance(e, ClientError):
        meta = e.response.get("ResponseMetadata", {})
        code = str(e.response.get("Error", {}).get("Code", ""))
        return int(meta.get("HTTPStatusCode") or 0) >= 500 or code in ("SlowDown", "Throttling")
    return isinstance(e, HTTPClientError)


RESUME_PIECE = 64 * 1024  # bytes asked of a body at once: a reset loses at most this much
RESUME_BACKOFF_S = 0.25  # first pause before re-requesting a broken body (doubles, jittered)
RESUME_MAX_BACKOFF_S = 10.0


class _ResumableBody(io.RawIOBase):
    """The body of an S3 GET that survives its connection dying mid-read: the rest is asked for
    again with a ranged GET pinned to the object's ETag, so the reader gets every byte once."""

    def __init__(self, storage: S3Storage, name: str, response: dict, start: int = 0):
        super().__init__()
        self._storage, self._name = storage, name
        self._body = response["Body"]
        self._etag = response.get("ETag")
        self._pos = start
        length = response.get("ContentLength")
        self._end = start + int(length) if length is not None else None
        # The CRC32 S3 keeps of a whole object (not of a range, not a multipart composite one),
        # checked here over all the pieces: botocore checks only a body read to its EOF in one
        # piece, and this reader stops at the Content-Length.
        crc = response.get("ChecksumCRC32")
        whole = start == 0 and "ContentRange" not in response
        composite = response.get("ChecksumType") == "COMPOSITE" or "-" in (crc or "")
        self._want_crc = crc if whole and crc and not composite else None
        self._crc = 0
        self._resumes = 0
        self._settings = storage.retry_settings

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed S3 body")
        if size is None or size < 0:
            return self.readall()
        return self._read(size) if size else b""

    def readall(self) -> bytes:
        chunks = []
        while chunk := self._read(RESUME_PIECE):
            chunks.append(chunk)
        return b"".join(chunks)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _read(self, size: int) -> bytes:

        errors = _body_errors()
        in_a_row = 0
        while True:
            if self._end is not None and self._pos >= self._end:
                return b""
            if self._body is None:
                self._reopen()
            try:
                data = self._body.read(min(size, RESUME_PIECE))
            except errors as e:
                in_a_row += 1
                self._give_up_or_wait(e, in_a_row)
                continue
            except BotoCoreError as e:  # e.g. FlexibleChecksumError: the bytes were corrupted
                self._close_body()
                raise StorageError(
                    f"cannot read {self._storage.describe(self._name)}: {type(e).__name__}: {e}"
                ) from None
            if not data:  # the end (botocore checks the Content-Length itself)
                self._end = self._pos
                return b""
            self._pos += len(data)
            if self._want_crc is not None:
                self._crc = zlib.crc32(data, self._crc)
                if self._end is not None and self._pos >= self._end:
                    self._check_crc()
            return data

    def _give_up_or_wait(self, e: BaseException, in_a_row: int) -> None:
        self._close_body()
        attempts = self._settings.max_attempts
        self._resumes += 1
        if in_a_row >= attempts or self._resumes > 4 * attempts:
            total = f" of {self._end}" if self._end is not None else ""
            why = (
                f"{in_a_row} attempts in a row without progress"
                if in_a_row >= attempts
                else f"{self._resumes} broken reads in all"
            )
            raise StorageError(
                f"cannot read {self._storage.describe(self._name)}: the connection broke "
                f"mid-object (last at byte {self._pos}{total}: {type(e).__name__}); gave up "
                f"after {why} ({ENV_MAX_ATTEMPTS}={attempts})"
            ) from None
        pause = min(RESUME_BACKOFF_S * 2 ** (in_a_row - 1), RESUME_MAX_BACKOFF_S)
        time.sleep(random.random() * pause)

    def _reopen(self) -> None:
        """Ask for the rest (botocore retries this request itself; its failure is final)."""

        st = self._storage
        rng = (
            f"bytes={self._pos}-{self._end - 1}" if self._end is not None else f"bytes={self._pos}-"
        )
        kwargs = {"IfMatch": self._etag} if self._etag else {}
        try:
            obj = st.client.get_object(
                Bucket=st.loc.bucket, Key=st._key(self._name), Range=rng, **kwargs
            )
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("PreconditionFailed", "412"):
                raise StorageError(
                    f"cannot read {st.describe(self._name)}: the object was replaced while "
                    "being read; read it again"
                ) from None
            raise st._error(e, f"cannot read {st.describe(self._name)}") from None
        except Exception as e:
            raise st._error(e, f"cannot read {st.describe(self._name)}") from None
        self._body = obj["Body"]

    def _check_crc(self) -> None:
        got = base64.b64encode(self._crc.to_bytes(4, "big")).decode()
        if got != self._want_crc:
            n = self._resumes + 1
            raise StorageError(
                f"cannot read {self._storage.describe(self._name)}: CRC32 {got} of the bytes "
                f"read (in {n} request{'s' if n > 1 else ''}) differs from the stored "
                f"{self._want_crc}: corrupted in transit"
            )

    def _close_body(self) -> None:
        if self._body is not None:
            with suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


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
        """Upload (multipart above 64 MB); the object is visible only once complete."""
        from boto3.s3.transfer import TransferConfig  # lazy: S3 only

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
