"""The one exception type for mistakes a user can fix (bad config, bad data, missing files).

The CLI prints these as a single line without a traceback; anything else is a bug and keeps
its traceback.
"""


class TunelabError(Exception):
    """A problem in the user's input: the message says what is wrong and how to fix it."""


class ConfigError(TunelabError):
    """An unknown key, a wrong type or a bad value in the config."""


class DataError(TunelabError):
    """A data file that is missing, empty, malformed, or lacks a needed column or value."""


class Interrupted(TunelabError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""
