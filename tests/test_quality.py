"""The real SmolLM2-135M on a shrunk protocol: admm < sparsegpt < wanda < magnitude in perplexity."""

from __future__ import annotations

import copy

import pytest

import llmprune
from llmprune import PruneConfig
from llmprune.data import calibration_windows

from .conftest import SHARED_DATA

pytestmark = pytest.mark.slow
NSAMPLES, SEQLEN, EVAL_SEQLEN, EVAL_WINDOWS = 16, 512, 512, 16
SETTINGS = {"2:4": ("2:4", None), "50%": ("unstructured", 0.5)}


@pytest.fixture(scope="module")
def ppl(smollm2) -> dict[tuple[str, str], float]:
    model, tokenizer = smollm2
    calib = calibration_windows(tokenizer, "wikitext2", NSAMPLES, SEQLEN, seed=0, data_dir=str(SHARED_DATA))
    out = {}
    for label, (pattern, sparsity) in SETTINGS.items():
        for method in ("admm", "sparsegpt", "wanda", "magnitude"):
            pruned = copy.deepcopy(model)
            llmprune.prune(pruned, tokenizer, PruneConfig(method=method, pattern=pattern, sparsity=sparsity), calib=calib, quiet=True)
            out[label, method] = llmprune.evaluate(pruned, tokenizer, ["wikitext2"], seqlen=EVAL_SEQLEN, windows=EVAL_WINDOWS,
                                                   data_dir=str(SHARED_DATA), quiet=True)["wikitext2"]
    print(out)
    return out


@pytest.mark.parametrize("label", list(SETTINGS))
def test_method_ordering(ppl, label):
    admm, sparsegpt, wanda, magnitude = (ppl[label, m] for m in ("admm", "sparsegpt", "wanda", "magnitude"))
    assert admm < sparsegpt < wanda < magnitude, (admm, sparsegpt, wanda, magnitude)
