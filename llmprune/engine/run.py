"""The run loop: capture, (OWL scan,) then per block: load, prune, store, persist, release.

Where blocks come from and go to is a :class:`~llmprune.engine.sources.Blocks` object. With a work dir
(``plan.run.work_dir``) every finished block, its masks and the next block's inputs are persisted, so a
killed run resumes bit-identically; the caller removes the work dir once its output is published.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LLMPruneError
from ..export.codecs import PackedMask
from ..patterns import Pattern
from ..quant import Grid
from ..stages.owl import allocate, outlier_scan
from ..targets import block_weight_counts, find_targets, untargeted, weight_key
from .block import prune_block
from .capture import Activations
from .plan import Plan
from .sources import Blocks
from .workdir import WorkDir

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the loop has accumulated after ``done`` blocks; saved whole as the work dir's record."""

    done: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    capture: float = 0.0
    owl_scan: float = 0.0
    outlier_ratios: list[float | None] | None = None
    tune: list[list[float]] = field(default_factory=list)
    block_weights: list[list[int]] = field(default_factory=list)  # [zeros, numel] of every block weight matrix
    elapsed: float = 0.0  # seconds spent before this process took over (resume)


@dataclass
class EngineResult:
    record: dict[str, Any]
    patterns: dict[str, Pattern]  # target weight name -> the pattern it obeys (per block with OWL)
    masks: dict[str, PackedMask]  # target weight name -> the mask its method chose
    grids: dict[str, Grid]  # target weight name -> its quantization grid (quantized patterns only)
    work: WorkDir | None  # to be removed by the caller once its output is safe


def check_shapes(blocks: nn.ModuleList, prefix: str, plan: Plan) -> int:
    """Refuse pattern/shape mismatches, and with ``--strict`` parameters nothing prunes, before any work;
    warn once about what stays dense. Returns the number of targets."""
    n = 0
    for i, block in enumerate(blocks):
        for name, t in find_targets(block, f"{prefix}.{i}", plan.skip).items():
            plan.pattern.check_shape(t.weight.shape, name)
            n += 1
    if n == 0:
        raise LLMPruneError("no Linear layer left to prune (check --skip)")
    if dense := not_pruned(blocks, prefix, plan):
        names = ", ".join(f"{d['name']} ({d['share']:.0%}, {d['reason']})" for d in dense[:6])
        more = f" and {len(dense) - 6} more" if len(dense) > 6 else ""
        if plan.run.strict and any(d["reason"] != "skip" for d in dense):
            raise LLMPruneError(f"--strict: {len(dense)} block parameter(s) of >= 1% would stay dense: {names}{more}")
        log.warning("left dense (>= 1%% of a block each, listed in the run record as not_pruned): %s%s", names, more)
    return n


def not_pruned(blocks: nn.ModuleList, prefix: str, plan: Plan) -> list[dict]:
    """Every block parameter of >= 1 % of its block that stays dense (see :func:`llmprune.targets.untargeted`)."""
    return [d for i, b in enumerate(blocks) for d in untargeted(b, f"{prefix}.{i}", plan.skip)]


def model_identity(model: nn.Module, blocks: nn.ModuleList) -> dict[str, Any]:
    """Cheap identity of a model (no hashing of weights): class, where it was loaded from, size."""
    return {"class": type(model).__name__, "source": str(getattr(model, "name_or_path", "")),
            "blocks": len(blocks), "params": sum(p.numel() for p in model.parameters())}


def fingerprint(plan: Plan, model_id: dict[str, Any], calib: torch.Tensor) -> dict[str, Any]:
    """What must be equal for a saved run to be resumed: the plan's result fields, the model, the data."""
    ids = calib.detach().to("cpu", torch.int64).contiguous()
    return {**plan.fingerprint(), "model": model_id,
            "calib": {"shape": list(ids.shape), "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}}


def _weight_shapes(blocks: nn.ModuleList, prefix: str, i: int, skip: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {t.key: tuple(t.weight.shape) for t in find_targets(blocks[i], f"{prefix}.{i}", skip).values()}


def run_blocks(prefix: str, blocks: nn.ModuleList, io: Blocks, calib: torch.Tensor, plan: Plan,
               model_id: dict[str, Any], quiet: bool = False, n_targets: int | None = None) -> EngineResult:
    """Prune every block through ``io`` as ``plan`` says (``n_targets``: what :func:`check_shapes` returned,
    when the caller already checked)."""
    run = plan.run
    device, store = run.device, torch.device("cpu") if run.offload_activations else run.device
    n_targets = check_shapes(blocks, prefix, plan) if n_targets is None else n_targets
    work = WorkDir(run.work_dir, fingerprint(plan, model_id, calib)) if run.work_dir else None
    saved = work.start(run.resume) if work is not None else None
    torch.manual_seed(plan.seed)

    t0 = time.perf_counter()
    if saved is None:
        state = RunState()
        acts = io.capture(calib, plan.batch_size, device, store)
        if plan.dense_targets:
            acts.targets = list(acts.batches)  # block 0 sees the same inputs in both models
        state.capture = time.perf_counter() - t0
        if plan.owl is not None:
            state.outlier_ratios = outlier_scan(prefix, blocks, io, acts, plan.skip, plan.owl.m, device, quiet)
            state.owl_scan = time.perf_counter() - t0 - state.capture
    else:
        state = RunState(**saved["record"])
        acts = Activations.from_state(work.acts(state.done), store, device)
        log.info("resuming from %s: %d of %d blocks already pruned", work.path, state.done, len(blocks))
    resumed_from = state.done if saved is not None else None
    patterns = [plan.pattern] * len(blocks)
    if state.outlier_ratios is not None:
        patterns = allocate(state.outlier_ratios, plan.pattern, plan.owl.lam)
    masks: dict[str, PackedMask] = {}
    grids: dict[str, Grid] = {}
    for i in range(state.done):
        tensors, block_masks, block_grids = work.block(i, _weight_shapes(blocks, prefix, i, plan.skip))
        io.restore(i, tensors, patterns[i], block_masks, block_grids)
        masks.update({k: PackedMask.of(m) for k, m in block_masks.items()})
        grids.update(block_grids)

    def commit(block: dict[str, torch.Tensor] | None = None, block_masks: dict[str, torch.Tensor] | None = None,
               block_grids: dict[str, Grid] | None = None) -> None:
        record = asdict(state) | {"elapsed": state.elapsed + time.perf_counter() - t0}
        work.commit(state.done, acts.state(), record, block, block_masks, block_grids)

    if work is not None and saved is None:
        commit()
    bar = tqdm(range(state.done, len(blocks)), desc=f"prune {plan.method} {plan.pattern.label}", disable=quiet,
               unit="block", initial=state.done, total=len(blocks))
    for i in bar:
        tb = time.perf_counter()
        acts.block = i
        io.load(i, device)
        records, block_masks, block_grids, tuned = prune_block(blocks[i], f"{prefix}.{i}", acts, plan, patterns[i],
                                                               device)
        state.layers += [r.__dict__ for r in records]
        state.block_weights.append(list(block_weight_counts(blocks[i])))
        if tuned is not None:
            state.tune.append(list(tuned))
        io.store(i, patterns[i], block_masks, block_grids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the block's time is its own, not the next one's
        state.block_seconds.append(time.perf_counter() - tb)
        state.done = i + 1
        masks.update({k: PackedMask.of(m) for k, m in block_masks.items()})
        grids.update(block_grids)
        if work is not None:
            commit(blocks[i].state_dict(), block_masks, block_grids)
        io.release(i)
        bar.set_postfix(err=f"{sum(r['recon_error'] for r in state.layers[-8:]) / min(8, len(state.layers)):.4f}")
    acts.batches.clear()  # free the activations before the caller's next step
    acts.targets = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    record = _record(state, plan, patterns, device, len(blocks), n_targets, t0, resumed_from)
    record["not_pruned"] = not_pruned(blocks, prefix, plan)
    return EngineResult(record, {weight_key(r["name"]): patterns[_block_of(r["name"], prefix)] for r in state.layers},
                        masks, grids, work)


def _block_of(name: str, prefix: str) -> int:
    return int(name[len(prefix) + 1:].split(".", 1)[0])


def _record(state: RunState, plan: Plan, patterns: list[Pattern], device: torch.device, n_blocks: int,
            n_targets: int, t0: float, resumed_from: int | None) -> dict[str, Any]:
    layers = state.layers
    record = {
        "device": str(device),
        "blocks": n_blocks,
        "targets": n_targets,
        "seconds": {"capture": state.capture, "owl_scan": state.owl_scan, "blocks": state.block_seconds,
                    "prune_total": state.elapsed + time.perf_counter() - t0},
        "layers": layers,
        "sparsity": sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
        / sum(r["shape"][0] * r["shape"][1] for r in layers),
        # over every weight matrix of the blocks, targets or not (routers, anything left dense)
        "sparsity_block_weights": sum(z for z, _ in state.block_weights) / max(1, sum(n for _, n in state.block_weights)),
    }
    if plan.pattern.quant is not None:
        record["quant"] = asdict(plan.pattern.quant)
    experts = [r for r in layers if r["name"].endswith("]")]
    if experts:  # what calibration reached the experts, and which fell back to magnitude
        tokens = [r["tokens"] for r in experts]
        record["experts"] = {"targets": len(experts), "tokens_min": min(tokens), "tokens_median": sorted(tokens)[len(tokens) // 2],
                             "tokens_max": max(tokens), "no_tokens": sum(t == 0 for t in tokens),
                             "magnitude_fallback": sum(r["method"] != plan.method for r in experts),
                             "min_tokens": plan.expert_min_tokens}
    if state.tune:  # relative block-output error before and after tuning, per block
        record["tune"] = [{"before": b, "after": a} for b, a in state.tune]
    if state.outlier_ratios is not None:
        record["allocation"] = {"method": "owl", "lambda": plan.owl.lam, "m": plan.owl.m,
                                "outlier_ratios": state.outlier_ratios, "sparsity": [p.sparsity for p in patterns]}
    if resumed_from is not None:
        record["resumed_from"] = resumed_from
    return record
