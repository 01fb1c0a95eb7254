"""The experts of a fused MoE tensor in one solve: their groups merged, their weights stacked.

Each expert of ``mlp.experts.gate_up_proj`` is its own layer with its own statistics, but the E solves
have the same shape, so a method that takes a leading batch dimension (``Method.batched``: admm) runs
them as one set of batched matmuls and Cholesky factorisations on the device instead of E small ones.
The result is the same as one by one (bit-exact in the tests). On CPU one by one measured faster (the
BLAS already uses every core, and the stacked tensors fall out of cache), so ``--batch-experts auto``
batches on CUDA only.
"""

from __future__ import annotations

import time

import torch

from ..errors import LLMPruneError
from ..methods import LayerStats, PruneResult, reconstruction_error
from ..patterns import Pattern
from ..quant import Grid
from ..targets import Target
from .plan import Plan


def store(name: str, weight: torch.Tensor, result: PruneResult, method: str, pattern: Pattern) -> None:
    """Write a method's result into the model's weight, refusing NaN/Inf and a missing grid."""
    if not torch.isfinite(result.weight).all():
        raise LLMPruneError(f"{name}: {method} produced NaN/Inf weights")
    if pattern.quant is not None and result.grid is None:
        raise LLMPruneError(f"{name}: {method} returned no quantization grid for {pattern.label}")
    # masked_fill turns the -0.0 that W * mask leaves into +0.0, so checkpoints round-trip bit-exactly.
    weight.data.copy_(result.weight.masked_fill(~result.mask, 0.0).to(weight.dtype))


def merge_expert_groups(groups: list[list[str]], targets: dict[str, Target]) -> list[list[str]]:
    """``groups`` with the experts of one fused tensor gathered where its first expert ran."""
    out: list[list[str]] = []
    where: dict[str, list[str]] = {}
    for group in groups:
        t = targets[group[0]]
        if t.expert is None:
            out.append(group)
        elif t.state_key in where:
            where[t.state_key].extend(group)
        else:
            where[t.state_key] = list(group)
            out.append(where[t.state_key])
    return out


def batchable(group: list[str], targets: dict[str, Target], rows: dict[str, int], plan: Plan) -> list[str]:
    """The experts of ``group`` to solve together: batching on, a batched method, enough tokens each, two or more."""
    if not (plan.run.batch_experts and plan.spec.batched):
        return []
    names = [n for n in group if targets[n].expert is not None and rows.get(n, 0) >= max(1, plan.expert_min_tokens)]
    return names if len(names) > 1 else []


def prune_batch(names: list[str], targets: dict[str, Target], stats: list[LayerStats], plan: Plan,
                pattern: Pattern, rows: dict[str, int]) -> list[tuple[dict, torch.Tensor, Grid | None]]:
    """Prune the experts ``names`` in one call of the plan's method; (record fields, mask, grid) per expert."""
    t0 = time.perf_counter()
    w0 = torch.stack([targets[n].weight.detach().to(torch.float32) for n in names])
    xtx = torch.stack([s.xtx for s in stats])
    if not torch.isfinite(xtx).all():
        bad = next(n for n, s in zip(names, stats) if not torch.isfinite(s.xtx).all())
        raise LLMPruneError(f"{bad}: calibration statistics contain NaN/Inf (overflow in the activations?)")
    try:
        result = plan.spec.fn(w0.clone(), LayerStats(xtx, xtx.diagonal(dim1=-2, dim2=-1).clone()), pattern,
                              plan.method_config)
    except (FloatingPointError, torch.linalg.LinAlgError) as e:
        raise LLMPruneError(f"{names[0]} (and {len(names) - 1} more experts): {plan.method} failed numerically: {e}") from e
    seconds = (time.perf_counter() - t0) / len(names)
    out = []
    for i, n in enumerate(names):
        grid = None if result.grid is None else Grid(result.grid.scale[i], result.grid.zero[i])
        weight = targets[n].weight
        store(n, weight, PruneResult(result.weight[i], result.mask[i], grid), plan.method, pattern)
        w1 = weight.data.to(torch.float32)
        fields = dict(name=n, shape=list(weight.shape), target=pattern.sparsity,
                      sparsity=1.0 - int(torch.count_nonzero(weight)) / weight.numel(),
                      recon_error=reconstruction_error(w0[i], w1, xtx[i]), seconds=seconds, tokens=rows[n],
                      method=plan.method)
        out.append((fields, result.mask[i], grid))
    return out
