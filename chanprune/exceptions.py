"""Exceptions raised by chanprune."""

from __future__ import annotations

__all__ = ["UnsupportedLayerError", "ConvergenceWarning"]


class UnsupportedLayerError(TypeError):
    """A module or architecture that chanprune does not know how to prune.

    The message names the offending module (by its ``named_modules()`` path where known)
    and lists what is supported.
    """


class ConvergenceWarning(UserWarning):
    """A solver stopped before reaching its tolerance; the message reports the gap."""
