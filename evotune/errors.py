"""The user's mistakes, one family: the CLI maps any ``UserError`` to exit code 2.

Each message is one line that names the file, line or key at fault and says what
to do. Anything else that escapes is evotune's failure (exit code 1, traceback).
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix: bad config, bad data, an output in the way."""

    exit_code = 2


class ConfigError(UserError):
    """A mistake in a config file, an override or a command-line option."""


class DataError(UserError):
    """A dataset that cannot be read as written: the message names the file and line."""


class ConversionError(UserError):
    """An InternEvo / XTuner / InternLM2 input that cannot be converted exactly."""


class OutputExistsError(UserError):
    """An output folder that already holds something; nothing is overwritten."""
