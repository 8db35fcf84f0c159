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

The modules: :mod:`~mcis_dist.storage.base` (the error, URL splitting, staged writes),
:mod:`~mcis_dist.storage.local` (:class:`LocalStorage`), :mod:`~mcis_dist.storage.s3`
(:class:`S3Storage` and how it rides out a flaky object store),
:mod:`~mcis_dist.storage.retry` (:class:`S3RetrySettings`, the ``MCIS_S3_*`` variables) and
:mod:`~mcis_dist.storage.resumable` (a GET body that resumes where its connection broke).
"""

from __future__ import annotations

import os
from typing import BinaryIO

from mcis_dist.storage.base import Staged, StorageError, is_s3_url
from mcis_dist.storage.local import LocalStorage
from mcis_dist.storage.retry import (
    ENV_CONNECT_TIMEOUT,
    ENV_MAX_ATTEMPTS,
    ENV_READ_TIMEOUT,
    ENV_RETRY_MODE,
    ENV_VARS,
    RETRY_MODES,
    S3RetrySettings,
)
from mcis_dist.storage.s3 import S3Storage

__all__ = [
    "ENV_CONNECT_TIMEOUT",
    "ENV_MAX_ATTEMPTS",
    "ENV_READ_TIMEOUT",
    "ENV_RETRY_MODE",
    "ENV_VARS",
    "RETRY_MODES",
    "LocalStorage",
    "S3RetrySettings",
    "S3Storage",
    "Staged",
    "Storage",
    "StorageError",
    "is_s3_url",
    "open_storage",
    "open_url",
]


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
