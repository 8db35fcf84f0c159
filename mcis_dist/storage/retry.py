"""How hard an S3 client tries: :class:`S3RetrySettings`, read from ``MCIS_S3_*`` variables.

The knobs are read from the environment when a process creates its client (so they reach build
pool workers and Ray actors started on the same machine): ``MCIS_S3_MAX_ATTEMPTS`` (default 8),
``MCIS_S3_RETRY_MODE`` (``standard`` or ``adaptive``), ``MCIS_S3_CONNECT_TIMEOUT`` (seconds,
default 10), ``MCIS_S3_READ_TIMEOUT`` (seconds without a byte before an attempt counts as
failed, default 60) and ``MCIS_S3_MULTIPART_MB`` (uploads above this size go in parts of this
size, default 64; S3's smallest part is 5). ``check_readable`` uses at most 2 attempts, to fail
fast on a wrong endpoint, bucket or key; only if those end in a 5xx, a reset or a timeout does it
retry with the full ``max_attempts``. How the settings are used: see :mod:`mcis_dist.storage.s3`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mcis_dist.storage.base import StorageError

ENV_MAX_ATTEMPTS = "MCIS_S3_MAX_ATTEMPTS"
ENV_RETRY_MODE = "MCIS_S3_RETRY_MODE"
ENV_CONNECT_TIMEOUT = "MCIS_S3_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "MCIS_S3_READ_TIMEOUT"
ENV_MULTIPART_MB = "MCIS_S3_MULTIPART_MB"
#: every ``MCIS_S3_*`` knob (what a process hands on to its Ray actors)
ENV_VARS = (
    ENV_MAX_ATTEMPTS,
    ENV_RETRY_MODE,
    ENV_CONNECT_TIMEOUT,
    ENV_READ_TIMEOUT,
    ENV_MULTIPART_MB,
)
RETRY_MODES = ("standard", "adaptive")


@dataclass(frozen=True)
class S3RetrySettings:
    """How hard an S3 client tries (see the module docstring); :meth:`from_env` reads the
    ``MCIS_S3_*`` variables."""

    max_attempts: int = 8
    mode: str = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_mb: int = 64

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
            multipart_mb=number(ENV_MULTIPART_MB, int, cls.multipart_mb, 5),
        )
