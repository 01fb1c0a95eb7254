"""Sparse fine-tuning: recover what pruning loses by training, keeping the pattern exact.

    result = llmprune.prune(model, tokenizer, PruneConfig(pattern="2:4"))
    tuned = llmprune.finetune(model, tokenizer, FinetuneConfig(mode="masked", kd=1.0), masks=result.masks,
                              patterns=result.patterns, teacher=dense_copy)
    tuned.save("out/smollm2-2of4-ft")          # a normal llmprune compressed checkpoint + curves (JSON, PNG)

Modes (``sparsity``): masked (the pruner's masks fixed), admm (NxMTransformer), sr-ste. Losses
(``losses``): CE, KD on logits, SquareHead on hidden states. The loop (``train``) is resumable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import eval_windows
from ..engine.plan import resolve_device
from ..errors import LLMPruneError
from ..export.codecs import PackedMask
from ..patterns import Pattern
from ..targets import by_expert, by_parameter, fused_experts
from .config import MODES, FinetuneConfig
from .plot import plot_curves
from .train import train as run_training

__all__ = ["MODES", "FinetuneConfig", "FinetuneResult", "finetune"]


@dataclass
class FinetuneResult:
    record: dict[str, Any]
    patterns: dict[str, Pattern]
    masks: dict[str, PackedMask]
    model: nn.Module
    tokenizer: Any = None

    def save(self, out_dir: str | os.PathLike, format: str = "compressed", overwrite: bool = False,
             extra_files: dict[str, bytes | str] | None = None) -> Path:
        """The fine-tuned model as a checkpoint, with ``llmprune_finetune.json`` and its curves as a PNG."""
        from ..export import save_pruned

        files = {"llmprune_finetune.json": json.dumps(self.record, indent=2, default=str),
                 "finetune_curves.png": plot_curves(self.record), **(extra_files or {})}
        return save_pruned(self.model, self.tokenizer, out_dir, format, self.patterns, self.masks,
                           overwrite=overwrite, extra_files=files)


def _unpacked(masks: dict[str, Any] | None) -> dict[str, torch.Tensor] | None:
    if masks is None:
        return None
    return {k: m.unpack() if isinstance(m, PackedMask) else m for k, m in masks.items()}


def finetune(model: nn.Module, tokenizer: Any, config: FinetuneConfig, patterns: dict[str, Pattern],
             masks: dict[str, Any] | None = None, teacher: nn.Module | None = None,
             windows: torch.Tensor | None = None, quiet: bool = False) -> FinetuneResult:
    """Fine-tune ``model`` in place keeping every target weight (``patterns``: weight name -> pattern) on its
    pattern. ``masks``: the pruner's masks (``masked`` mode keeps them; without them it starts from the
    magnitude masks of the current weights). ``teacher``: the dense model for KD / SquareHead.
    ``windows`` (``[n, seqlen]`` token ids) overrides the training text named in ``config``."""
    config.check()
    if quantized := next((k for k, p in patterns.items() if p.quant is not None), None):
        raise LLMPruneError(f"finetune: {quantized} is quantized ({patterns[quantized].label}); training would move "
                            "it off its grid: fine-tune the full-precision pruned model, then quantize")
    if config.needs_teacher and teacher is None:
        raise LLMPruneError("finetune: --kd / --squarehead need a dense teacher (--teacher MODEL)")
    params = dict(model.named_parameters())
    fused = fused_experts(model)  # a fused tensor's experts train as one parameter, each on its own mask
    targets, start = by_parameter(patterns, _unpacked(masks), fused)
    if unknown := sorted(set(targets) - set(params)):
        raise LLMPruneError(f"finetune: {unknown[0]} is not a parameter of the model")
    device = resolve_device(config.device)
    if windows is None:
        if tokenizer is None:
            raise LLMPruneError("finetune: pass a tokenizer, or training token ids (windows=...)")
        windows = eval_windows(tokenizer, config.train, config.seqlen, None, config.data_dir, split="calib")
    torch.manual_seed(config.seed)
    work = None
    if config.work_dir:
        work = Path(config.work_dir).expanduser()
        work.mkdir(parents=True, exist_ok=True)
    home = next(model.parameters()).device
    model.to(device)
    if teacher is not None:  # run under no_grad; its parameters are left as they are
        teacher.to(device).eval()
    try:
        record, final = run_training(model, windows, config, targets, start, teacher, device, work, quiet)
    finally:
        model.to(home)
        if teacher is not None:
            teacher.to(home)
    for name, mask in final.items():  # the exact pattern holds: checked as inspect checks a checkpoint
        w = params[name].detach().cpu()
        if targets[name].violations(w) or targets[name].violations(mask) or bool(w[~mask.cpu()].any()):
            raise LLMPruneError(f"finetune: {name} left its pattern {targets[name]}")
    record["config"] = config.to_dict()
    final = by_expert({k: m.cpu() for k, m in final.items()}, fused)
    return FinetuneResult(record, dict(patterns), {k: PackedMask.of(m) for k, m in final.items()}, model, tokenizer)
