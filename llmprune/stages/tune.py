"""Block reconstruction: after a block's Linears are pruned one by one, fine-tune their kept weights jointly
so the whole block maps its calibration inputs onto the dense targets (masks fixed).

Each Linear's solver only sees its own output error; tuning the block end to end also fixes how the
errors of q/k/v, o, gate/up and down combine through the attention softmax, the SiLU gate and the
residual stream (the idea of block-wise reconstruction in EBFT / BESA-style pruners). The objective is
the relative squared error of the block output, the only thing the next block sees.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..finetune.sparsity import mask_grads


def _fp32(v: Any) -> Any:
    return v.to(torch.float32) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _loss(block: nn.Module, x: torch.Tensor, target: torch.Tensor, kwargs: dict[str, Any],
          run: Callable[..., torch.Tensor]) -> torch.Tensor:
    out = run(block(x.to(torch.float32), **tree_map(_fp32, kwargs)))
    return (out.to(torch.float32) - target.to(torch.float32)).square().sum()


def tune_block(block: nn.Module, weights: list[nn.Parameter], masks: list[torch.Tensor], batches: list[torch.Tensor],
               targets: list[torch.Tensor],
               kwargs_for: Callable[[torch.Tensor], dict[str, Any]], epochs: int, lr: float, device: torch.device,
               run: Callable[..., torch.Tensor]) -> tuple[float, float]:
    """Adam on the entries of ``weights`` (Linear weights of ``block``) that their pruning ``masks`` keep, for
    ``epochs`` passes over ``batches``, minimising ‖block(x) − target‖². Runs in fp32 whatever the block's
    dtype; pruned entries stay zero.

    Returns the relative error ``Σ‖block(x) − t‖² / Σ‖t‖²`` before and after; a tuning that did not lower
    it is undone, so the calibration fit never gets worse.
    """
    dtypes = {n: t.dtype for n, t in [*block.named_parameters(), *block.named_buffers()]}
    block.to(torch.float32)
    masks = [m.to(w.device) for w, m in zip(weights, masks)]
    saved = [w.detach().clone() for w in weights]
    scale = sum(float(t.to(torch.float32).square().sum()) for t in targets)

    def error() -> float:
        with torch.no_grad():
            return sum(float(_loss(block, x.to(device), t.to(device), kwargs_for(x), run))
                       for x, t in zip(batches, targets)) / scale

    before = error()
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    opt = torch.optim.Adam(weights, lr=lr)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for x, t in zip(batches, targets):
                    opt.zero_grad(set_to_none=False)
                    (_loss(block, x.to(device), t.to(device), kwargs_for(x), run) / scale).backward()
                    mask_grads(weights, masks)  # Adam moments of pruned entries stay zero, so they never move
                    opt.step()
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None
        for p in frozen:
            p.requires_grad_(True)
    after = error()
    if not after < before:
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
        after = before
    for n, t in [*block.named_parameters(), *block.named_buffers()]:
        if t.dtype != dtypes[n]:
            t.data = t.data.to(dtypes[n])
    return before, after
