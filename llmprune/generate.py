"""``python -m llmprune generate``: greedy decoding of a pruned checkpoint through the packed kernels, timed.

The loop is the lean one a benchmark needs: one prefill call, then one forward per token over a static KV
cache (no per-step cache growth, no ``generate`` bookkeeping), argmax on the last position only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LLMPruneError


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    prompt_tokens: int
    prefill_s: float
    decode_s: float  # the steps after the first new token

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s else float("nan")


@torch.inference_mode()
def greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> Generation:
    """Greedy continuation of ``input_ids`` ``[1, T]``: prefill once, then a forward per token."""
    from transformers import StaticCache

    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise LLMPruneError("greedy decoding takes one non-empty prompt")
    if max_new_tokens < 1:
        raise LLMPruneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    prompt = input_ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt + max_new_tokens)
    start = time.perf_counter()
    logits = model(input_ids, cache=cache, use_cache=True, cache_position=torch.arange(prompt),
                   logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - start
    tokens = [int(token)]
    start = time.perf_counter()
    for pos in range(prompt, prompt + max_new_tokens - 1):
        logits = model(token, cache=cache, use_cache=True, cache_position=torch.tensor([pos]),
                       logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return Generation(tokens, prompt, prefill, time.perf_counter() - start)


def load_for_generation(source: str, kernels: bool, dtype: str = "auto") -> tuple[nn.Module, Any]:
    """(model, tokenizer): an llmprune checkpoint with its kernel modules (``kernels``), or any dense model."""
    from .api import _tokenizer
    from .export import load
    from .models import load_model

    path = Path(source).expanduser()
    if (path / "config.json").is_file() and "sparsity_config" in (path / "config.json").read_text():
        model = load(path, dtype=None if dtype == "auto" else dtype, kernels=kernels)
        tokenizer = _tokenizer(path)
        if tokenizer is None:
            raise LLMPruneError(f"{path}: no tokenizer files to encode the prompt with")
        return model, tokenizer
    model, tokenizer = load_model(source, dtype)
    return model, tokenizer


def build_parser() -> argparse.ArgumentParser:
    from .flags import Parser

    p = Parser(prog="python -m llmprune generate",
               description="Greedy text from a model; prints the text, then prefill and decode tokens/s.")
    p.add_argument("--model", required=True, help="llmprune checkpoint dir (pruned Linears run packed), or any "
                                                  "hub id / dir / .gguf (dense)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    p.add_argument("--no-kernels", action="store_true", help="decode pruned weights with pure torch instead")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.prompt.strip():
        raise LLMPruneError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise LLMPruneError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise LLMPruneError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    path = Path(args.model).expanduser()
    if not path.exists() and (args.model.startswith((".", "/", "~")) or args.model.endswith(".gguf")):
        raise LLMPruneError(f"model not found: {args.model}")
    model, tokenizer = load_for_generation(args.model, not args.no_kernels, args.dtype)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    out = greedy(model, ids, args.max_new_tokens)
    print(args.prompt + tokenizer.decode(out.tokens, skip_special_tokens=True), flush=True)
    print(f"prefill: {out.prompt_tokens} tokens, {out.prefill_tokens_per_s:.1f} tokens/s | decode: "
          f"{len(out.tokens)} tokens, {out.decode_tokens_per_s:.1f} tokens/s | threads {torch.get_num_threads()}")
    return 0
