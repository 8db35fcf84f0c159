"""The error a stage raises when it cannot run or finish, shared by every layer.

It sits at the bottom so that the on-disk formats (which say "run `mcis cams` first") and the
stage runtime raise the same class; the CLI turns it into one line and exit code 1.
"""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage cannot finish: a worker bug, too many lost actors, inputs that do not match."""


def reason(e: BaseException) -> str:
    """``TypeName: first line of the message``: why one sample or shard failed, for a log line
    or a manifest's list of skipped samples."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
