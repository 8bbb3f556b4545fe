"""Error classes the command line turns into one-line messages (cli.main): a usage error (a bad option or
value, exit code 2) or an error of a file, a run folder or a checkpoint (exit code 1)."""
from __future__ import annotations


class UsageError(ValueError):
    """A bad option or option value: the message names the option and what is wrong. Exit code 2."""


class ConfigError(UsageError):
    """A bad model or training configuration value (from --set, a preset or an option)."""


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked (locked by another process, not a run, nothing to resume, a
    different run). Exit code 1, or 2 when `usage` is set (the user can fix it with an option)."""

    def __init__(self, message: str, *, usage: bool = False):
        super().__init__(message)
        self.usage = usage


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, non-finite, or not matching its config."""


class DataError(ValueError):
    """Bad input data. The message names the file, the conversation and the field."""
