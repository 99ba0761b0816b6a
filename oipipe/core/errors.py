"""The exceptions every module raises and `config.stage_main` maps to exit codes.

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
