"""The one command-line path of every entry point: the options a stage takes, logging, and the
mapping of errors to exit codes, so every stage and tool answers alike.

Exit codes: 0 ok, 2 bad config or input (the message says which and how to fix it), 1 the work
failed, 130 interrupted (completed work is kept).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from oipipe.core.config import load_params
from oipipe.core.errors import ConfigError, InputError, StageError

EXIT_CODES = "Exit codes: 0 ok, 2 bad config or input, 1 the stage failed, 130 interrupted."
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
log = logging.getLogger(__name__)


def setup_logging() -> None:
    """INFO and up on stderr, one format for every entry point (a worker process too)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def guarded(
    name: str,
    work: Callable[[], Any],
    interrupted: str = "interrupted; completed work is kept, rerun to resume",
) -> int:
    """Run `work` and turn what it raises into an exit code, logged in one line under `name`."""
    setup_logging()
    try:
        work()
    except (ConfigError, InputError) as e:
        log.error("%s: %s", name, e)
        return 2
    except StageError as e:
        log.error("%s failed: %s", name, e)
        return 1
    except KeyboardInterrupt:
        log.error("%s: %s", name, interrupted)
        return 130
    return 0


def stage_parser(
    name: str, description: str | None = None, module: str | None = None
) -> argparse.ArgumentParser:
    """The options every stage takes (`--params`, overrides); one with options of its own adds
    them to this parser. `module`: what `python -m` runs, `stages.<name>` unless given."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module or f'stages.{name}'}", description=description, epilog=EXIT_CODES
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="composed config (default: ./params.yaml, what DVC runs with)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of params.yaml, e.g. data.seed=1 'data.classes=[Cat,Dog]'",
    )
    return parser


def run_stage(
    name: str,
    run: Callable[[DictConfig], Any],
    argv: Sequence[str] | None = None,
    args: argparse.Namespace | None = None,
) -> int:
    """Parse, load `params.yaml` with the overrides, run, and return the exit code.

    `args`: already parsed by an entry point with options of its own (`stage_parser` plus them).
    """
    if args is None:
        doc = (run.__doc__ or "").strip().split("\n\n")[0] or None
        args = stage_parser(name, doc).parse_intermixed_args(argv)
    return guarded(name, lambda: run(load_params(args.params, args.overrides)))


def main(name: str, run: Callable[[DictConfig], Any]) -> None:
    """A stage's `main()`: `run_stage` with the process's arguments, then exit with its code."""
    sys.exit(run_stage(name, run))
