"""A local folder as storage: atomic writes through a temporary file and ``os.replace``.

A file written here appears whole or not at all: it is written under a hidden temporary name in
the destination folder (same file system), flushed, and renamed over its final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from mcis_dist.storage.base import Staged, StorageError, _staging


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
