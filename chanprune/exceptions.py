"""Exceptions and warnings raised by chanprune.

Every error chanprune defines derives from :class:`ChanpruneError` and every warning from
:class:`ChanpruneWarning`, so a caller can catch or filter them all at once. Bad arguments
raise the built-in ``ValueError`` and ``TypeError``, as in scikit-learn.
"""

from __future__ import annotations

__all__ = [
    "ChanpruneError",
    "ChanpruneWarning",
    "UnsupportedLayerError",
    "ConvergenceWarning",
    "SingularGramWarning",
    "PlanWarning",
]


class ChanpruneError(Exception):
    """Base class of the errors chanprune defines."""


class ChanpruneWarning(UserWarning):
    """Base class of the warnings chanprune defines."""


class UnsupportedLayerError(ChanpruneError, TypeError):
    """A module or architecture that chanprune does not know how to prune.

    The message names the offending module (by its ``named_modules()`` path where known)
    and says what is supported. A ``TypeError`` too, as it always was.
    """


class ConvergenceWarning(ChanpruneWarning):
    """A solver stopped before reaching its tolerance; the message reports the gap."""


class SingularGramWarning(ChanpruneWarning):
    """A least-squares system was singular; the minimum-norm solution was used instead."""


class PlanWarning(ChanpruneWarning):
    """Channel groups kept whole because an op the planner does not know touches them."""
