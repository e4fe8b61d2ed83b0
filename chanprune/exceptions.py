"""Exceptions raised by chanprune."""

from __future__ import annotations

__all__ = ["UnsupportedLayerError", "ConvergenceWarning", "SingularGramWarning"]


class UnsupportedLayerError(TypeError):
    """A module or architecture that chanprune does not know how to prune.

    The message names the offending module (by its ``named_modules()`` path where known)
    and lists what is supported.
    """


class ConvergenceWarning(UserWarning):
    """A solver stopped before reaching its tolerance; the message reports the gap."""


class SingularGramWarning(UserWarning):
    """A least-squares system was singular; the minimum-norm solution was used instead."""
