"""``python -m llmprune generate``: greedy decoding of a pruned checkpoint through the packed kernels, timed.

One prefill call, then one step per token, argmax on the last position only. The step is
:class:`llmprune.lean.LeanDecoder` (fused projections, preallocated cache, the C++ ops called directly) for
the architectures it runs, else transformers' forward over a static KV cache (``--no-lean`` forces it).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import LLMPruneError
from .lean import ARCHS

LM_HEADS = ("dense", "int8")


@dataclass
class Generation:
    tokens: list[int]  # the new tokens
    prompt_tokens: int
    prefill_s: float
    decode_s: float  # the steps after the first new token
    loop: str  # "lean" (llmprune.lean) or "transformers"

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if len(self.tokens) > 1 and self.decode_s else float("nan")


def _transformers_step(model: nn.Module, max_len: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """transformers' own forward over a static cache: ``(ids [T], position) -> logits of the last``."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)

    def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
        return model(ids[None], cache=cache, use_cache=True, cache_position=torch.arange(pos, pos + len(ids)),
                     logits_to_keep=1).logits[0, -1]

    return step


@torch.inference_mode()
def greedy(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, lean: bool = True,
           lm_head: str = "dense", act_int8: bool = True) -> Generation:
    """Greedy continuation of ``input_ids`` ``[1, T]``: prefill once, then a forward per token, through
    :class:`~llmprune.lean.LeanDecoder` where it runs the architecture (and ``lean``), else transformers.
    ``act_int8``: int4 / int8 weights multiply int8-rounded tokens (``kernels.cpu.linear``)."""
    from .lean import lean_decoder

    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise LLMPruneError("greedy decoding takes one non-empty prompt")
    if max_new_tokens < 1:
        raise LLMPruneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if lm_head not in LM_HEADS:
        raise LLMPruneError(f"--lm-head must be one of {', '.join(LM_HEADS)}, got {lm_head!r}")
    prompt, max_len = input_ids.shape[1], input_ids.shape[1] + max_new_tokens
    for module in model.modules():
        if hasattr(module, "act_int8"):
            module.act_int8 = act_int8
    decoder = lean_decoder(model, max_len, lm_head, act_int8) if lean else None
    if decoder is not None:
        step, loop = (lambda ids, pos: decoder.step(ids)), "lean"
    elif lm_head != "dense":
        raise LLMPruneError(f"--lm-head {lm_head} needs the lean loop (architectures: {', '.join(ARCHS)})")
    else:
        step, loop = _transformers_step(model, max_len), "transformers"
    start = time.perf_counter()
    token = step(input_ids[0], 0).argmax()
    prefill = time.perf_counter() - start
    tokens = [int(token)]
    start = time.perf_counter()
    for pos in range(prompt, max_len - 1):
        token = step(token[None], pos).argmax()
        tokens.append(int(token))
    return Generation(tokens, prompt, prefill, time.perf_counter() - start, loop)


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
    p.add_argument("--lm-head", default="dense", choices=LM_HEADS, help="int8: the output head int8 per row "
                   "(a quarter of fp32's bytes; the largest matrix of a small model)")
    p.add_argument("--exact-act", action="store_true", help="int4 / int8 weights multiply fp32 tokens (slower) "
                   "instead of tokens rounded to int8 per 32 values")
    p.add_argument("--no-lean", action="store_true", help="step through transformers' forward instead of "
                   "llmprune's lean decode loop (fused projections, preallocated cache)")
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
    out = greedy(model, ids, args.max_new_tokens, lean=not args.no_lean, lm_head=args.lm_head,
                 act_int8=not args.exact_act)
    print(args.prompt + tokenizer.decode(out.tokens, skip_special_tokens=True), flush=True)
    print(f"prefill: {out.prompt_tokens} tokens, {out.prefill_tokens_per_s:.1f} tokens/s | decode: "
          f"{len(out.tokens)} tokens, {out.decode_tokens_per_s:.1f} tokens/s | threads {torch.get_num_threads()} | {out.loop} loop")
    return 0
