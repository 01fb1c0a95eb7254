"""Python API mirroring the CLI.

    model, tokenizer = llmprune.load_model("HuggingFaceTB/SmolLM2-135M")
    record = llmprune.prune(model, tokenizer, llmprune.PruneConfig(pattern="2:4", nsamples=128))
    ppl = llmprune.evaluate(model, tokenizer, ["wikitext2"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import PruneConfig
from .data import calibration_windows, eval_windows
from .engine import check_shapes, prune_model, resolve_device
from .eval import perplexity
from .models import find_blocks


def prune(model: nn.Module, tokenizer: Any, config: PruneConfig, calib: torch.Tensor | None = None, quiet: bool = False) -> dict[str, Any]:
    """Prune ``model`` in place; returns the pruning record (per-layer sparsity, error, timings).

    ``calib`` (``[n, seqlen]`` token ids) overrides the calibration data named in ``config``.
    """
    config.validate()
    prefix, blocks = find_blocks(model)
    check_shapes(blocks, prefix, config)  # refuse impossible patterns before reading any data
    if calib is None:
        calib = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, config.data_dir)
    return prune_model(model, calib, config, quiet=quiet)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    datasets: Sequence[str] = ("wikitext2",),
    seqlen: int = 2048,
    windows: int | None = None,
    device: str = "auto",
    data_dir: str | None = None,
    batch_size: int = 1,
    quiet: bool = False,
) -> dict[str, float]:
    """Perplexity on each dataset (name or text-file path) with the standard non-overlapping protocol."""
    dev = resolve_device(device)
    return {
        name: perplexity(model, eval_windows(tokenizer, name, seqlen, windows, data_dir), dev, batch_size, f"eval {name}", quiet)
        for name in datasets
    }
