"""Typed errors for local-learning training: each message says what the user should change."""
from __future__ import annotations


class LocalTrainingError(ValueError):
    """Bad configuration for `memfit train local` (unknown model, non-positive size, ...)."""


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not on this machine; the message names the command that installs them."""
