"""The two classes every config module builds on: the error and the section base."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """Invalid config; ``problems`` holds one line per problem (``str(err)`` joins them)."""

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]

    def __reduce__(self):  # keep ``problems`` when pickled (Ray ships exceptions)
        return (type(self), (str(self), self.problems))


class ConfigSection(BaseModel):
    """Base of every config section: unknown keys forbidden, strict types, int -> float ok."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, strict=True, allow_inf_nan=False
    )
