"""The exceptions every module raises and `oipipe.core.cli` maps to exit codes, and the one
form an error is kept in (`error_text`).

Kept apart so that data modules (datasets, openimages, http, ...) need not import the config
module only for an error class.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key. Exit code 2."""


class InputError(ValueError):
    """Bad input data or request (unknown class, empty result): a clear message, exit code 2."""


class StageError(RuntimeError):
    """An expected failure with a message that says it all (the network gave up, training
    diverged): exit code 1 without a traceback."""


ERROR_CHARS = 2000  # what a record, a CSV cell, a log line or an MLflow tag keeps of an error


def error_text(e: BaseException | str, limit: int = ERROR_CHARS) -> str:
    """`Type: message` (or the text given), stripped and cut at `limit` characters: the one form
    in which every record, row and tag of the pipeline keeps an error."""
    text = e if isinstance(e, str) else f"{type(e).__name__}: {str(e).strip()}"
    return text.strip()[:limit]
