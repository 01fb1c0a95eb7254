"""Saving an in-memory pruned model: the config it is saved with, the Linears left dense, and the
tensor-by-tensor walk through its state dict into a :class:`CheckpointWriter`."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..quant import Grid
from ..targets import fused_experts, split_expert
from .codecs import PackedMask
from .hf import QUANT_METHOD
from .writer import CheckpointWriter


def output_config(model: torch.nn.Module) -> Any:
    """The config a checkpoint of ``model`` is saved with: it says what the saved weights are, so quantization
    metadata inherited from loading (a GGUF file's ``quant_method: gguf``, the weights dequantized; an
    llmprune checkpoint's own, which the writer sets again for the compressed format) is dropped, or
    transformers, Trainer, llm-compressor and vLLM treat the plain weights as quantized."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)).lower() in ("gguf", QUANT_METHOD):
        del config.quantization_config
    config.dtype = next(iter(model.state_dict().values())).dtype if model.dtype is None else model.dtype
    return config


def ignored_linears(model: torch.nn.Module, patterns: dict[str, Pattern]) -> list[str]:
    """Linear weights left dense (compressed-tensors' ``ignore`` list)."""
    return [f"{n}.weight" for n, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and f"{n}.weight" not in patterns]


def save_pruned(model: torch.nn.Module, tokenizer: Any, out_dir: str | os.PathLike, fmt: str = "compressed",
                patterns: dict[str, Pattern] | None = None, masks: dict[str, torch.Tensor | PackedMask] | None = None,
                overwrite: bool = False, extra_files: dict[str, bytes | str] | None = None,
                max_shard_bytes: int = 2**30, grids: dict[str, Grid] | None = None) -> Path:
    """Save an in-memory pruned model; ``patterns`` maps parameter names to the pattern each obeys and
    ``masks`` (optional) to the mask its pruner chose, ``grids`` to a quantized target's grid (usually all
    from :class:`llmprune.PruneResult`).

    Tensors stream through :class:`CheckpointWriter` one at a time; tied weights are stored once (the first
    name, as ``save_pretrained`` does), and Linear weights left dense are listed as ``ignore``.
    """
    patterns, masks, grids = dict(patterns or {}), dict(masks or {}), dict(grids or {})
    state = model.state_dict()
    fused = fused_experts(model)
    expert_patterns: dict[str, dict[int, Pattern]] = {}
    for key in list(patterns):
        if (split := split_expert(key)) is not None and split[0] in fused:
            expert_patterns.setdefault(split[0], {})[split[1]] = patterns.pop(key)
    known = set(state) | {f"{k}[{e}]" for k in expert_patterns for e in range(fused[k][0])}
    if unknown := sorted((set(patterns) | set(masks) | {f"{k}[{e}]" for k, p in expert_patterns.items() for e in p}) - known):
        raise LLMPruneError(f"pattern or mask given for {unknown[0]}, which is not a parameter of the model")
    for key, per_expert in expert_patterns.items():
        if len(per_expert) != fused[key][0] or len(set(per_expert.values())) != 1:
            raise LLMPruneError(f"{key}: its experts must all be pruned, to one pattern (got {len(per_expert)} of "
                                f"{fused[key][0]}, {len(set(per_expert.values()))} pattern(s))")
    config = output_config(model)
    ignore = ignored_linears(model, patterns)
    seen: dict[tuple, str] = {}
    with CheckpointWriter(out_dir, fmt, overwrite, max_shard_bytes) as writer:
        for name, tensor in state.items():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if tensor.numel() and key in seen:
                if name in patterns:
                    raise LLMPruneError(f"{name} is tied to {seen[key]}; prune {seen[key]} instead")
                continue
            seen[key] = name
            if name in expert_patterns:
                n, transposed = fused[name]
                writer.add_experts(name, tensor, expert_patterns[name][0], [masks.get(f"{name}[{e}]") for e in range(n)],
                                   transposed, [grids.get(f"{name}[{e}]") for e in range(n)])
            else:
                writer.add(name, tensor, patterns.get(name), masks.get(name), grids.get(name))
        generation = model.generation_config if getattr(model, "can_generate", lambda: False)() else None
        return writer.finish(config, tokenizer, {"ignore": ignore}, extra_files, generation)
