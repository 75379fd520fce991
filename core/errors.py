"""User-facing errors.

A :class:`CoreError` carries a one-line message that names the bad file, field or
argument. The CLI prints it without a traceback; the app shows it in an error box.
"""

from __future__ import annotations


class CoreError(Exception):
    """An error caused by bad input, with a message a user can act on."""


class ConfigError(CoreError):
    """An unknown key or a bad value in a configuration."""


class StoreError(CoreError):
    """A missing, corrupt or inconsistent on-disk store (radio map, dataset, run)."""


class CoverageError(CoreError):
    """A radio map that covers too little of its area: a property of the scene and the settings, so the same
    inputs fail again (``make-corpus`` remembers it)."""
