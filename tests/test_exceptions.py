"""chanprune's errors and warnings share one base each, so callers can catch them all."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _graph_models import DataDependent, Shuffle

import chanprune
from chanprune.graph import trace_plan


def test_an_untraceable_model_raises_a_chanprune_error_that_is_still_a_type_error():
    with pytest.raises(chanprune.ChanpruneError, match="cannot be traced") as info:
        chanprune.prune_model(DataDependent(), torch.randn(4, 3, 16, 16), speedup=1.5,
                              progress=False)  # fmt: skip
    assert isinstance(info.value, (chanprune.UnsupportedLayerError, TypeError))


def test_chanprune_warnings_share_one_base():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trace_plan(Shuffle(), (3, 16, 16))  # a channel shuffle: groups kept whole
        # Two identical columns: a singular Gram, solved by the minimum-norm solution.
        x = np.random.default_rng(0).standard_normal((50, 2))
        stats = chanprune.LayerStats.from_samples(
            np.hstack([x, x[:, :1]])[:, :, None, None], x @ np.ones((2, 1))
        )
        chanprune.least_squares_refit(stats.moments(), np.arange(3), ridge=0.0)
    kinds = {type(w.message) for w in seen if issubclass(w.category, chanprune.ChanpruneWarning)}
    assert kinds == {chanprune.PlanWarning, chanprune.SingularGramWarning}
