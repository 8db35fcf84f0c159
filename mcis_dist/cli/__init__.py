"""The ``mcis`` command line. Subcommands only parse their arguments and call the library.

:mod:`~mcis_dist.cli.parser` holds the parser (every command and option),
:mod:`~mcis_dist.cli.commands` the handlers, and ``main`` here dispatches and turns the library's
errors into a message and an exit status. Each handler imports the stage it runs inside the
function (``# lazy: per command``), so ``mcis --help`` loads neither torch nor Ray.
"""

from __future__ import annotations

import os
import sys

from mcis_dist.cli.commands import EXIT_USAGE, HANDLERS, UserError
from mcis_dist.cli.parser import build_parser

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from mcis_dist.config import ConfigError  # lazy: per command
    from mcis_dist.data.loader import LoaderError  # lazy: per command
    from mcis_dist.formats.shards import ManifestError  # lazy: per command
    from mcis_dist.models.weights import WeightsError  # lazy: per command
    from mcis_dist.runtime.checkpoint import CheckpointError  # lazy: per command
    from mcis_dist.runtime.sharded import StageError  # lazy: per command
    from mcis_dist.runtime.trainer import TrainingError  # lazy: per command
    from mcis_dist.shards.build import BuildError  # lazy: per command
    from mcis_dist.shards.sources import SourceError  # lazy: per command
    from mcis_dist.storage import StorageError  # lazy: per command

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home by default
    args = build_parser().parse_args(argv)
    action = next(
        (
            getattr(args, a)
            for a in ("shards_command", "weights_command", "eval_command")
            if getattr(args, a, None)
        ),
        None,
    )
    handler = HANDLERS[(args.command, action)]
    try:
        return handler(args)
    except (
        UserError,
        ConfigError,
        BuildError,
        ManifestError,
        SourceError,
        StorageError,
        LoaderError,
        WeightsError,
        TrainingError,
        StageError,
        CheckpointError,
    ) as e:
        print(f"mcis: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "mcis: interrupted; finished shards are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
