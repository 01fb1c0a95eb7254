"""OWL allocation as pure functions: outlier ratios and the per-block sparsities they give."""

from __future__ import annotations

import pytest
import torch

from llmprune import LLMPruneError
from llmprune.stages.owl import outlier_ratio, owl_sparsities


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.ones(4, 24), torch.tensor([[100.0, 1.0], [1.0, 1.0]])]  # 100 numbers, mean 1.99
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.01)
    assert outlier_ratio(scores, 100.0) == 0.0


@pytest.mark.parametrize("ratios,sparsity,lam", [
    ([0.01, 0.03, 0.02, 0.05], 0.5, 0.08),
    ([0.2, 0.1, 0.1, 0.4, 0.3], 0.7, 0.05),
    ([0.0, 1.0], 0.6, 0.1),
])
def test_owl_sparsities_average_the_target_and_favour_outliers(ratios, sparsity, lam):
    out = owl_sparsities(ratios, sparsity, lam)
    assert sum(out) / len(out) == pytest.approx(sparsity, abs=1e-12)
    assert max(out) - min(out) == pytest.approx(2 * lam, abs=1e-12)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [out[i] for i in order] == sorted(out, reverse=True)  # more outliers, fewer weights removed


def test_equal_ratios_or_zero_lambda_give_the_uniform_allocation():
    assert owl_sparsities([0.02] * 3, 0.5, 0.08) == pytest.approx([0.5] * 3, abs=1e-12)
    assert owl_sparsities([0.01, 0.05], 0.7, 0.0) == pytest.approx([0.7] * 2, abs=1e-12)


def test_band_leaving_zero_one_is_refused():
    with pytest.raises(LLMPruneError, match="smaller --owl-lambda"):
        owl_sparsities([0.0, 1.0], 0.05, 0.1)
