"""Errors that reach the user as one clear line and exit code 2 (see :mod:`cliprail.cli`)."""

from __future__ import annotations


class CliprailError(Exception):
    """Base of the errors the CLI reports as ``cliprail: error: <message>`` with exit code 2."""


class ConfigError(CliprailError):
    """A configuration value is out of range or inconsistent with another; names the field."""


class EnvError(CliprailError):
    """The environment cannot be built or is not supported (unknown id, action space...)."""


class CheckpointError(CliprailError):
    """A run folder or checkpoint is missing, incomplete, corrupt or unsafe to load."""


class RunDirError(CliprailError):
    """A run folder cannot be used as asked (exists without --resume, not writable...)."""
