"""What both storages share: the error they raise, URL splitting and staged (atomic) writes.

:class:`Staged` and :func:`_staging` give :meth:`LocalStorage.staged` and
:meth:`S3Storage.staged` one shape: a temporary local file that is published (renamed into
place, or uploaded) only when the writing block ends without error, and removed in every case.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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


@dataclass(frozen=True)
class _S3Location:
    bucket: str
    prefix: str
