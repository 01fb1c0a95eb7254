"""One decoder block: stream the calibration batches through it, prune each target, advance."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LLMPruneError
from ..methods import METHODS, LayerStats, MagnitudeConfig, dense_target, paired_error, reconstruction_error
from ..patterns import Pattern
from ..quant import Grid
from ..stages.tune import tune_block
from ..targets import Target, find_targets
from .capture import Activations, StopForward, block_out
from .experts import batchable, merge_expert_groups, prune_batch, store
from .plan import Plan
from .statistics import DenseTap, ErrorMeter, StatsCollector


@dataclass
class LayerRecord:
    name: str
    shape: list[int]
    target: float  # the sparsity of the pattern it was pruned to (per block with OWL allocation)
    sparsity: float
    recon_error: float
    seconds: float
    tokens: int = 0  # calibration rows its input had (for an expert: the tokens routed to it)
    method: str = ""  # the method used: the plan's, or magnitude for an expert below plan.expert_min_tokens


@torch.no_grad()
def run_block(block: nn.Module, acts: Activations, device: torch.device, replace: bool,
              collector: StatsCollector | None = None, keep: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Stream every batch through ``block``; with ``replace`` the outputs become the next inputs, and
    ``keep`` collects them.

    With the collector's dense tap, each batch of ``acts.targets`` first runs through the dense copy;
    its outputs (the next dense targets) are returned.
    """
    tap = collector.tap if collector is not None else None
    targets = []
    for j, x in enumerate(acts.batches):
        # a collector that stops early never replaces, and its targets are not used
        with contextlib.suppress(StopForward):
            if tap is not None:
                t = acts.targets[j]
                targets.append(tap(t.to(device), acts.kwargs_for(t)).to(t.device))
        with contextlib.suppress(StopForward):
            out = block_out(block(x.to(device), **acts.kwargs_for(x)))
        if collector is not None:
            collector.end_batch()
        if replace:
            acts.batches[j] = out.to(x.device)
        if keep is not None:
            keep.append(out.to(x.device))
    return targets


def prune_target(name: str, target: Target, stats: LayerStats, plan: Plan, pattern: Pattern,
                 xtd: torch.Tensor | None = None, dense_sq: float | None = None,
                 tokens: int = 0) -> tuple[LayerRecord, torch.Tensor, Grid | None]:
    """Apply the plan's method with ``pattern`` to one target in place; returns its record, the method's mask
    and (with ``pattern.quant``) the grid its kept weights lie on.

    With ``xtd`` (= XₚᵀX_d, pruned-model inputs against dense-model inputs) and ``dense_sq`` (= ‖X_dWᵀ‖²)
    the layer is fitted to the dense model's outputs (:func:`llmprune.methods.dense_target`). Without
    XᵀX the record's error is NaN until the block's :class:`ErrorMeter` fills it in.

    An expert that saw fewer than ``plan.expert_min_tokens`` calibration tokens is pruned by magnitude:
    a Gram of a few rows is mostly damping, and a weight update fitted to them would overfit those tokens.
    """
    t0 = time.perf_counter()
    method, config = plan.method, plan.method_config
    if target.expert is not None and tokens < plan.expert_min_tokens:
        method, config, stats, xtd = "magnitude", MagnitudeConfig(), LayerStats(None, None), None
    elif tokens == 0 and METHODS[method].stats:
        raise LLMPruneError(f"{name}: never ran in the calibration forward pass, so {method} has no statistics")
    xtx = stats.xtx
    if any(s is not None and not torch.isfinite(s).all() for s in (*stats, xtd)):
        raise LLMPruneError(f"{name}: calibration statistics contain NaN/Inf (overflow in the activations?)")
    weight = target.weight
    w0 = weight.detach().to(torch.float32, copy=True)  # one fp32 copy, whatever the model dtype
    try:
        start = w0.clone() if xtd is None else dense_target(w0, xtx, xtd, config.percdamp)
        result = METHODS[method].fn(start, stats, pattern, config)
    except (FloatingPointError, torch.linalg.LinAlgError) as e:
        raise LLMPruneError(f"{name}: {method} failed numerically: {e}") from e
    store(name, weight, result, method, pattern)
    sparsity = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
    w1 = weight.data.to(torch.float32)
    if xtx is None:
        err = float("nan")
    else:
        err = reconstruction_error(w0, w1, xtx) if xtd is None else paired_error(w0, w1, xtx, xtd, dense_sq)
    record = LayerRecord(name, list(weight.shape), pattern.sparsity, sparsity, err, time.perf_counter() - t0,
                         tokens, method)
    return record, result.mask, result.grid


def tunable(targets: dict[str, Target], masks: dict[str, torch.Tensor]) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """The parameters holding ``targets`` and their masks in the parameters' own layout (an experts
    tensor's per-expert masks stacked, transposed back where it stores ``[in, out]``)."""
    params: dict[int, tuple[nn.Parameter, dict[int, torch.Tensor]]] = {}
    for t in targets.values():
        p = getattr(t.module, t.param)
        mask = masks[t.key]
        if t.expert is not None and t.module.is_transposed:
            mask = mask.T
        params.setdefault(id(p), (p, {}))[1][-1 if t.expert is None else t.expert] = mask
    out_p, out_m = [], []
    for p, parts in params.values():
        if -1 in parts:
            out_m.append(parts[-1])
        else:  # an expert tensor: a skipped expert keeps every weight
            out_m.append(torch.stack([parts.get(e, torch.ones(p.shape[1:], dtype=torch.bool)) for e in range(p.shape[0])]))
        out_p.append(p)
    return out_p, out_m


@torch.no_grad()
def _collect(block: nn.Module, linears: dict[str, Target], acts: Activations, device: torch.device, plan: Plan,
             tap: DenseTap | None, stop_early: bool = False,
             keep: list[torch.Tensor] | None = None) -> tuple[StatsCollector, list[torch.Tensor]]:
    collector = StatsCollector(linears, device, plan.stats(), tap, stop_early)
    try:
        targets = run_block(block, acts, device, replace=False, collector=collector, keep=keep)
    finally:
        collector.remove()
    return collector, targets


def prune_block(block: nn.Module, prefix: str, acts: Activations, plan: Plan, pattern: Pattern,
                device: torch.device) -> tuple[list[LayerRecord], dict[str, torch.Tensor], dict[str, Grid],
                                               tuple[float, float] | None]:
    """Prune every target of one block (already on ``device``) to ``pattern`` and advance the activations.

    With ``plan.sequential`` the groups of Linears sharing an input (q/k/v, o, gate/up, down) are
    pruned in execution order, each from statistics taken through the already-pruned earlier groups,
    so every layer compensates for the error upstream of it (one extra pass per group, stopped once
    the group has run).
    With ``acts.targets`` (``plan.dense_targets``) a dense copy of the block runs on the dense stream
    beside it and every Linear is fitted to the dense outputs; this implies the sequential order, since
    a group fitted to inputs its pruned predecessors no longer produce corrects the upstream error a
    second time (measured: SmolLM2 2:4 perplexity 309 instead of 43).
    With ``plan.tune_epochs`` the pruned block is then fine-tuned end to end (:func:`llmprune.stages.tune.tune_block`)
    towards the dense model's outputs, or without dense targets towards the dense block's outputs on the
    same inputs (kept from the first pass).

    Returns the layer records, each target's mask (its weight key -> bool ``[out, in]``, on the host), with
    ``pattern.quant`` each target's grid (on the host), and the block's relative output error before and
    after tuning (``None`` without tuning).
    """
    linears = find_targets(block, prefix, plan.skip)
    tap = DenseTap(block, prefix, plan.skip) if acts.targets is not None else None
    dense = copy.deepcopy(block) if "xtx" not in plan.stats() and linears else None  # for the ErrorMeter
    local: list[torch.Tensor] | None = [] if plan.tune_epochs and tap is None else None
    collector, targets = _collect(block, linears, acts, device, plan, tap, keep=local)
    records: list[LayerRecord] = []
    masks: dict[str, torch.Tensor] = {}
    grids: dict[str, Grid] = {}
    seen = set(collector.owner)  # targets that ran at all (an expert may get no token)
    for k, group in enumerate(merge_expert_groups(collector.groups(), linears)):
        ran = [n for n in group if n in seen]
        if (plan.sequential or tap is not None) and k > 0 and ran:
            collector, _ = _collect(block, {n: linears[n] for n in ran}, acts, device, plan, tap, stop_early=True)
        done: dict[str, tuple[LayerRecord, torch.Tensor, Grid | None]] = {}
        if batch := batchable(group, linears, collector.rows, plan):
            for fields, mask, grid in prune_batch(batch, linears, [collector.get(n) for n in batch], plan, pattern,
                                                  collector.rows):
                done[fields["name"]] = (LayerRecord(**fields), mask, grid)
        for n in group:
            record, mask, grid = done.get(n) or prune_target(n, linears[n], collector.get(n), plan, pattern,
                                                             *collector.paired(n), tokens=collector.rows.get(n, 0))
            records.append(record)
            masks[linears[n].key] = mask.to("cpu")
            if grid is not None:
                grids[linears[n].key] = Grid(*(t.to("cpu") for t in grid))
    del collector
    if dense is not None:  # exact errors for methods without XᵀX, as pruned (before tuning), on the dense inputs
        meter = ErrorMeter(dense, linears, prefix, plan.skip)
        run_block(dense, acts, device, replace=False)
        errors = meter.errors()
        for record in records:
            record.recon_error = errors[record.name]  # NaN for an expert no token reached
        del dense
    tuned = None
    if plan.tune_epochs and linears:
        weights, weight_masks = tunable(linears, masks)
        tuned = tune_block(block, weights, weight_masks,
                           acts.batches, targets if tap is not None else local, acts.kwargs_for, plan.tune_epochs,
                           plan.tune_lr, device, block_out)
    if tap is not None:
        tap.remove()
        acts.targets = targets
    run_block(block, acts, device, replace=True)
    return records, masks, grids, tuned
