"""An S3 GET body that survives its connection dying mid-read.

botocore's retries end when the answer's headers arrive, so a GET whose *body* dies halfway
(reset, truncated, or silent for ``read_timeout``) is resumed here: :class:`_ResumableBody`
re-requests the rest with ``Range: bytes=<next byte>-`` and ``If-Match: <ETag>`` (an object
replaced meanwhile fails instead of splicing two versions), so the reader sees every byte once,
in order. It gives up after ``max_attempts`` failures in a row without progress (or
``4 * max_attempts`` in all) with a :class:`StorageError` naming the ``s3://`` URL. A whole
object read (in one piece or several) is checked against the CRC32 stored with it, when there
is one; a mismatch raises :class:`StorageError` at the end of the read (a streaming reader has
seen the bytes before it by then: ``read_bytes`` has not).
"""

from __future__ import annotations

import base64
import functools
import io
import random
import time
import zlib
from contextlib import suppress
from typing import Protocol

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from urllib3.exceptions import HTTPError as URLLib3Error

from mcis_dist.storage.base import StorageError, _S3Location
from mcis_dist.storage.retry import ENV_MAX_ATTEMPTS, S3RetrySettings


class _ObjectSource(Protocol):
    """What a resumable body needs of the storage it reads from (an ``S3Storage``)."""

    loc: _S3Location

    @property
    def client(self): ...

    @property
    def retry_settings(self) -> S3RetrySettings: ...

    def describe(self, name: str = "") -> str: ...

    def _key(self, name: str) -> str: ...

    def _error(self, e: Exception, what: str) -> StorageError: ...


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


RESUME_PIECE = 64 * 1024  # bytes asked of a body at once: a reset loses at most this much
RESUME_BACKOFF_S = 0.25  # first pause before re-requesting a broken body (doubles, jittered)
RESUME_MAX_BACKOFF_S = 10.0


class _ResumableBody(io.RawIOBase):
    """The body of an S3 GET that survives its connection dying mid-read: the rest is asked for
    again with a ranged GET pinned to the object's ETag, so the reader gets every byte once."""

    def __init__(self, storage: _ObjectSource, name: str, response: dict, start: int = 0):
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
