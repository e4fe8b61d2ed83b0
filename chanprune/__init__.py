"""chanprune: reconstruction-based channel pruning for PyTorch.

Implements the channel pruning of He, Zhang and Sun (ICCV 2017): sample a layer's input
patches and its original outputs, select the input channels to keep (LASSO with an exact
budget, or one of the baseline criteria), refit the kept weights by least squares, and
remove the dropped channels for real.
"""

from .exceptions import ConvergenceWarning, SingularGramWarning, UnsupportedLayerError
from .layer import LayerPruneResult, prune_layer, prune_layer_from_stats
from .refit import least_squares_refit, reconstruction_error
from .selection import SELECTORS, Selection
from .stats import LayerStats, Moments

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "LayerPruneResult",
    "LayerStats",
    "Moments",
    "SELECTORS",
    "Selection",
    "SingularGramWarning",
    "UnsupportedLayerError",
    "least_squares_refit",
    "prune_layer",
    "prune_layer_from_stats",
    "reconstruction_error",
]
