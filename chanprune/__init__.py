"""chanprune: reconstruction-based channel pruning for PyTorch.

Implements the channel pruning of He, Zhang and Sun (ICCV 2017): sample a layer's input
patches and its original outputs, select the input channels to keep (LASSO with an exact
budget, or one of the baseline criteria), refit the kept weights by least squares, and
remove the dropped channels for real.
"""

from .exceptions import (
    ChanpruneError,
    ChanpruneWarning,
    ConvergenceWarning,
    PlanWarning,
    SingularGramWarning,
    UnsupportedLayerError,
)
from .io import load, save
from .layer import LayerPruneResult, prune_layer, prune_layer_from_stats
from .prune import MODEL_METHODS, plan_widths, prunable_groups, prune_model
from .refit import least_squares_refit, reconstruction_error
from .report import LayerReport, PruneReport
from .selection import SELECTORS, Selection
from .stats import LayerStats, Moments

__version__ = "0.1.0"

__all__ = [
    "ChanpruneError",
    "ChanpruneWarning",
    "ConvergenceWarning",
    "PlanWarning",
    "LayerPruneResult",
    "LayerReport",
    "MODEL_METHODS",
    "PruneReport",
    "LayerStats",
    "Moments",
    "SELECTORS",
    "Selection",
    "SingularGramWarning",
    "UnsupportedLayerError",
    "least_squares_refit",
    "load",
    "plan_widths",
    "prune_layer",
    "prune_layer_from_stats",
    "prune_model",
    "prunable_groups",
    "reconstruction_error",
    "save",
]
