"""Perplexity with the standard protocol: the whole test text tokenized once, non-overlapping windows,
tail dropped; ppl = exp(mean next-token NLL over every predicted token)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LLMPruneError


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``model`` on ``device``: moved whole when it fits, else streamed module by module (accelerate)."""
    home = next(model.parameters()).device
    if device == home:
        yield
        return
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    fits = device.type != "cuda" or size < 0.8 * torch.cuda.mem_get_info(device)[0]
    if fits:
        model.to(device)
        try:
            yield
        finally:
            model.to(home)
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    cpu_offload(model, execution_device=device)
    try:
        yield
    finally:
        remove_hook_from_module(model, recurse=True)


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1, desc: str = "eval", quiet: bool = False) -> float:
    """Perplexity of ``model`` over token ``windows`` ``[n, seqlen]``."""
    nll, count = 0.0, 0
    with on_device(model, device):
        for batch in tqdm(windows.split(batch_size), desc=desc, disable=quiet, unit="batch"):
            batch = batch.to(device)
            logits = model(batch, use_cache=False).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += batch[:, 1:].numel()
    ppl = math.exp(nll / count)
    if not math.isfinite(ppl):
        raise LLMPruneError(f"{desc}: perplexity is not finite (the model produces NaN/Inf logits)")
    return ppl
