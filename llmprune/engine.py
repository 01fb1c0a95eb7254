"""The layer-streaming engine: one decoder block on the compute device at a time.

1. Capture the inputs of block 0 (hidden states plus every keyword argument the block needs) by
   running the model up to block 0 and stopping there.
2. For each block: bring it to the device, stream the calibration batches through it while forward
   hooks accumulate XᵀX (fp32) per distinct Linear input, prune every Linear with the chosen method,
   re-run the pruned block to produce the next block's inputs, send it away.

Where blocks come from and go to is a :class:`Blocks` object: :class:`InPlaceBlocks` for a model in
memory, ``llmprune.stream`` for a checkpoint read from and written to disk block by block. With a work
dir (``config.work_dir``) every finished block is persisted so a killed run resumes (``llmprune.resume``).

Linears that read the same tensor (q/k/v, gate/up) share one XᵀX, found on the first batch.
Peak device memory is about one block + its XᵀX matrices + the activations (on the host with
``offload_activations``); activations stay in the model dtype, only one batch at a time is cast to fp32.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import outlier_ratio, owl_sparsities
from .config import PruneConfig
from .errors import LLMPruneError
from .methods import METHODS, dense_target, paired_error, reconstruction_error
from .models import find_blocks, find_linears, move_non_block_modules, to_device
from .patterns import Pattern
from .resume import WorkDir
from .tune import tune_block

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once everything wanted from a forward pass has been seen (block 0's inputs during
    capture; a sequential group's inputs), so the rest of the pass is skipped."""


@dataclass
class Activations:
    """Calibration hidden states between blocks, batched, plus the block kwargs per batch size.

    ``targets``: the dense model's hidden states for the same batches (``config.dense_targets``).
    """

    batches: list[torch.Tensor]
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    targets: list[torch.Tensor] | None = None

    def kwargs_for(self, x: torch.Tensor) -> dict[str, Any]:
        return self.kwargs[x.shape[0]]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LLMPruneError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLMPruneError(f"device {device} requested but CUDA is not available")
    return dev


@torch.no_grad()
def capture_inputs(
    model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int, device: torch.device, store: torch.device
) -> Activations:
    """Run the model up to block 0 for every calibration batch and keep what block 0 receives."""
    home = next(blocks[0].parameters()).device
    move_non_block_modules(model, blocks, device)
    blocks[0].to(device)
    try:
        return capture_first_block(model, blocks[0], ids, batch_size, device, store)
    finally:
        blocks[0].to(home)
        move_non_block_modules(model, blocks, home)


@torch.no_grad()
def capture_first_block(
    model: nn.Module, first: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device, store: torch.device
) -> Activations:
    """The inputs of block ``first``, with whatever runs before it already on ``device``.

    ``first`` itself never runs, so its weights may still be on the meta device.
    """
    acts = Activations([])

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        acts.batches.append(hidden.to(store))
        acts.kwargs.setdefault(hidden.shape[0], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return acts


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class DenseTap:
    """A dense copy of a block, run on the dense stream, keeping each Linear's input for the current batch
    and summing ‖X_dWᵀ‖² per Linear, so the pruned stream's hooks can pair their inputs with it."""

    def __init__(self, block: nn.Module, prefix: str, skip: list[str]) -> None:
        self.block = copy.deepcopy(block)
        self.inputs: dict[str, torch.Tensor] = {}
        self.out_sq: dict[str, float] = {}
        self.names: set[str] = set()
        self.stop_early = False
        self._handles = [lin.register_forward_hook(self._hook(name))
                         for name, lin in find_linears(self.block, prefix, skip).items()]

    def _hook(self, name: str) -> Callable:
        def hook(mod: nn.Linear, inp: tuple, out: torch.Tensor) -> None:
            if name in self.names:
                self.inputs[name] = inp[0]
                y = out.to(torch.float32) - (0 if mod.bias is None else mod.bias.to(torch.float32))
                self.out_sq[name] = self.out_sq.get(name, 0.0) + float(y.square().sum())
                if self.stop_early and self.names <= self.inputs.keys():
                    raise _StopForward

        return hook

    def start(self, names: list[str], stop_early: bool) -> None:
        """Record (from zero) the Linears ``names`` in the passes that follow, which end early once all
        of them have run if ``stop_early``."""
        self.names, self.stop_early = set(names), stop_early
        for n in names:
            self.out_sq[n] = 0.0

    def __call__(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The dense block's output (raises :class:`_StopForward` when stopping early)."""
        self.inputs.clear()
        return _block_out(self.block(x, **kwargs))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.inputs.clear()


class XtXCollector:
    """Forward hooks accumulating XᵀX per distinct Linear input; Linears fed the same tensor share one.

    With a :class:`DenseTap` each also accumulates XᵀX_d against the dense model's input to the same Linear.
    With ``stop_early`` the rest of a forward pass is skipped once every Linear has run.
    """

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device, tap: DenseTap | None = None,
                 stop_early: bool = False) -> None:
        self.linears = linears
        self.device = device
        self.tap = tap
        self.stop_early = stop_early
        self.owner: dict[str, str] = {}  # linear -> linear whose XᵀX it shares
        self.xtx: dict[str, torch.Tensor] = {}
        self.xtd: dict[str, torch.Tensor] = {}
        if tap is not None:
            tap.start(list(linears), stop_early)
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}  # holds inputs so their memory is not reused
        self._fired: set[str] = set()
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_mod: nn.Module, inp: tuple, _out: Any) -> None:
            x = inp[0]
            self._fired.add(name)
            if name not in self.owner:
                sig = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
                self.owner[name] = self._seen.setdefault(sig, (x, name))[1]
            if self.owner[name] == name:
                self._accumulate(name, x)
            if self.stop_early and self._fired == self.linears.keys():
                raise _StopForward

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if name not in self.xtx:
            self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], device=self.device, dtype=torch.float32)
            if self.tap is not None:
                self.xtd[name] = torch.zeros_like(self.xtx[name])
        self.xtx[name].addmm_(x.T, x)
        if self.tap is not None:
            self.xtd[name].addmm_(x.T, self.tap.inputs[name].reshape(-1, x.shape[1]).to(torch.float32))

    def end_batch(self) -> None:
        self._seen.clear()
        self._fired.clear()

    def get(self, name: str) -> torch.Tensor:
        return self.xtx[self.owner[name]]

    def paired(self, name: str) -> tuple[torch.Tensor | None, float | None]:
        """XᵀX_d and ‖X_dWᵀ‖² of ``name`` (``None``s without a dense tap)."""
        if self.tap is None:
            return None, None
        return self.xtd[self.owner[name]], self.tap.out_sq[name]

    def groups(self) -> list[list[str]]:
        """Linears grouped by shared input, in execution order."""
        out: dict[str, list[str]] = {}
        for name, own in self.owner.items():
            out.setdefault(own, []).append(name)
        return list(out.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def run_block(block: nn.Module, acts: Activations, device: torch.device, replace: bool,
              collector: XtXCollector | None = None, keep: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Stream every batch through ``block``; with ``replace`` the outputs become the next inputs, and
    ``keep`` collects them.

    With the collector's dense tap, each batch of ``acts.targets`` first runs through the dense copy;
    its outputs (the next dense targets) are returned.
    """
    tap = collector.tap if collector is not None else None
    targets = []
    for j, x in enumerate(acts.batches):
        # a collector that stops early never replaces, and its targets are not used
        with contextlib.suppress(_StopForward):
            if tap is not None:
                t = acts.targets[j]
                targets.append(tap(t.to(device), acts.kwargs_for(t)).to(t.device))
        with contextlib.suppress(_StopForward):
            out = _block_out(block(x.to(device), **acts.kwargs_for(x)))
        if collector is not None:
            collector.end_batch()
        if replace:
            acts.batches[j] = out.to(x.device)
        if keep is not None:
            keep.append(out.to(x.device))
    return targets


@dataclass
class LayerRecord:
    name: str
    shape: list[int]
    target: float  # the sparsity of the pattern it was pruned to (per block with OWL allocation)
    sparsity: float
    recon_error: float
    seconds: float


def prune_linear(name: str, lin: nn.Linear, xtx: torch.Tensor, config: PruneConfig, pattern: Pattern,
                 xtd: torch.Tensor | None = None, dense_sq: float | None = None) -> LayerRecord:
    """Apply the configured method with ``pattern`` to one Linear in place; checks numerics with the layer's name.

    With ``xtd`` (= XₚᵀX_d, pruned-model inputs against dense-model inputs) and ``dense_sq`` (= ‖X_dWᵀ‖²)
    the layer is fitted to the dense model's outputs (:func:`llmprune.methods.dense_target`).
    """
    t0 = time.perf_counter()
    method = METHODS[config.method]
    if not torch.isfinite(xtx).all() or (xtd is not None and not torch.isfinite(xtd).all()):
        raise LLMPruneError(f"{name}: calibration statistics XᵀX contain NaN/Inf (overflow in the activations?)")
    w0 = lin.weight.detach().to(torch.float32, copy=True)  # one fp32 copy, whatever the model dtype
    method_config = config.method_config()
    try:
        target = w0.clone() if xtd is None else dense_target(w0, xtx, xtd, method_config.percdamp)
        result = method.fn(target, xtx if method.needs_xtx else None, pattern, method_config)
    except (FloatingPointError, torch.linalg.LinAlgError) as e:
        raise LLMPruneError(f"{name}: {config.method} failed numerically: {e}") from e
    if not torch.isfinite(result.weight).all():
        raise LLMPruneError(f"{name}: {config.method} produced NaN/Inf weights")
    # masked_fill turns the -0.0 that W * mask leaves into +0.0, so checkpoints round-trip bit-exactly.
    lin.weight.data.copy_(result.weight.masked_fill(~result.mask, 0.0).to(lin.weight.dtype))
    sparsity = 1.0 - int(torch.count_nonzero(lin.weight)) / lin.weight.numel()
    w1 = lin.weight.data.to(torch.float32)
    err = reconstruction_error(w0, w1, xtx) if xtd is None else paired_error(w0, w1, xtx, xtd, dense_sq)
    return LayerRecord(name, list(lin.weight.shape), pattern.sparsity, sparsity, err, time.perf_counter() - t0)


def check_shapes(blocks: nn.ModuleList, prefix: str, config: PruneConfig) -> int:
    """Refuse pattern/shape mismatches before any work; returns the number of target Linears."""
    pattern = config.resolved_pattern()
    n = 0
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block, f"{prefix}.{i}", config.skip).items():
            pattern.check_shape(lin.weight.shape, name)
            n += 1
    if n == 0:
        raise LLMPruneError("no Linear layer left to prune (check --skip)")
    return n


@torch.no_grad()
def _collect(block: nn.Module, linears: dict[str, nn.Linear], acts: Activations, device: torch.device,
             tap: DenseTap | None, stop_early: bool = False,
             keep: list[torch.Tensor] | None = None) -> tuple[XtXCollector, list[torch.Tensor]]:
    collector = XtXCollector(linears, device, tap, stop_early)
    try:
        targets = run_block(block, acts, device, replace=False, collector=collector, keep=keep)
    finally:
        collector.remove()
    return collector, targets


def prune_block(block: nn.Module, prefix: str, acts: Activations, config: PruneConfig, pattern: Pattern,
                device: torch.device) -> tuple[list[LayerRecord], tuple[float, float] | None]:
    """Prune every target Linear of one block (already on ``device``) to ``pattern`` and advance the activations.

    With ``config.sequential`` the groups of Linears sharing an input (q/k/v, o, gate/up, down) are
    pruned in execution order, each from statistics taken through the already-pruned earlier groups,
    so every layer compensates for the error upstream of it (one extra pass per group, stopped once
    the group has run).
    With ``acts.targets`` (``config.dense_targets``) a dense copy of the block runs on the dense stream
    beside it and every Linear is fitted to the dense outputs; this implies the sequential order, since
    a group fitted to inputs its pruned predecessors no longer produce corrects the upstream error a
    second time (measured: SmolLM2 2:4 perplexity 309 instead of 43).
    With ``config.tune_epochs`` the pruned block is then fine-tuned end to end (:func:`llmprune.tune.tune_block`)
    towards the dense model's outputs, or without dense targets towards the dense block's outputs on the
    same inputs (kept from the first pass). Returns the layer records and the block's relative output error
    before and after tuning (``None`` without tuning).
    """
    linears = find_linears(block, prefix, config.skip)
    tap = DenseTap(block, prefix, config.skip) if acts.targets is not None else None
    local: list[torch.Tensor] | None = [] if config.tune_epochs and tap is None else None
    collector, targets = _collect(block, linears, acts, device, tap, keep=local)
    records: list[LayerRecord] = []
    for k, group in enumerate(collector.groups()):
        if (config.sequential or tap is not None) and k > 0:
            collector, _ = _collect(block, {n: linears[n] for n in group}, acts, device, tap, stop_early=True)
        records += [prune_linear(n, linears[n], collector.get(n), config, pattern, *collector.paired(n)) for n in group]
    del collector
    tuned = None
    if config.tune_epochs and linears:
        tuned = tune_block(block, [lin.weight for lin in linears.values()], acts.batches,
                           targets if tap is not None else local, acts.kwargs_for, config.tune_epochs,
                           config.tune_lr, device, _block_out)
    if tap is not None:
        tap.remove()
        acts.targets = targets
    run_block(block, acts, device, replace=True)
    return records, tuned


@torch.no_grad()
def outlier_scan(prefix: str, blocks: nn.ModuleList, io: Blocks, acts: Activations, config: PruneConfig,
                 device: torch.device, quiet: bool = False) -> list[float | None]:
    """OWL's outlier ratio of every dense block (``None`` for a block without target Linears).

    One pass of the dense model over the calibration data, a block at a time, keeping only the squared
    norm of each Linear's input features (the Wanda score's ‖x_j‖²). ``acts`` is left as it was.
    """
    acts = Activations(list(acts.batches), acts.kwargs)  # the pruning pass restarts from block 0's inputs
    ratios: list[float | None] = []
    for i in tqdm(range(len(blocks)), desc="owl scan", disable=quiet, unit="block"):
        io.load(i, device)
        linears = find_linears(blocks[i], f"{prefix}.{i}", config.skip)
        sq: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable:
            def record(_mod: nn.Module, inp: tuple, _out: Any) -> None:
                x = inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float32)
                sq[name] = sq[name] + x.square().sum(0) if name in sq else x.square().sum(0)

            return record

        handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
        try:
            run_block(blocks[i], acts, device, replace=True)
        finally:
            for h in handles:
                h.remove()
        scores = [lin.weight.detach().abs().to(torch.float32) * sq[n].sqrt() for n, lin in linears.items()]
        ratios.append(outlier_ratio(scores, config.owl_m) if scores else None)
        io.unload(i)
    return ratios


def allocate(ratios: list[float | None], pattern: Pattern, config: PruneConfig) -> list[Pattern]:
    """One pattern per block: OWL sparsities over the blocks that have targets (the rest keep ``pattern``)."""
    have = [i for i, r in enumerate(ratios) if r is not None]
    out = [pattern] * len(ratios)
    for i, s in zip(have, owl_sparsities([ratios[i] for i in have], pattern.sparsity, config.owl_lambda)):
        out[i] = replace(pattern, sparsity=s)
    return out


class Blocks(Protocol):
    """Where the decoder blocks come from and where the pruned ones go."""

    def capture(self, ids: torch.Tensor, batch_size: int, device: torch.device, store: torch.device) -> Activations:
        """The inputs of block 0 for the calibration windows ``ids``."""

    def load(self, i: int, device: torch.device) -> None:
        """Put dense block ``i`` on ``device``."""

    def unload(self, i: int) -> None:
        """Put dense block ``i`` (on the device, unchanged) away again."""

    def store(self, i: int, pattern: Pattern) -> None:
        """Block ``i`` is pruned to ``pattern`` (still on the device): keep it wherever the result goes."""

    def release(self, i: int) -> None:
        """Free the device (and host) memory of stored block ``i``."""

    def restore(self, i: int, tensors: dict[str, torch.Tensor], pattern: Pattern) -> None:
        """Block ``i`` was pruned to ``pattern`` by an earlier, interrupted run: keep its saved state dict."""


class InPlaceBlocks:
    """Blocks of a model in memory, pruned in place; each visits the device and goes back home."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self.model, self.blocks = model, blocks
        self.home = next(blocks[0].parameters()).device

    def capture(self, ids: torch.Tensor, batch_size: int, device: torch.device, store: torch.device) -> Activations:
        return capture_inputs(self.model, self.blocks, ids, batch_size, device, store)

    def load(self, i: int, device: torch.device) -> None:
        self.blocks[i].to(device)

    def unload(self, i: int) -> None:
        self.blocks[i].to(self.home)

    def store(self, i: int, pattern: Pattern) -> None:
        self.blocks[i].to(self.home)

    def release(self, i: int) -> None:
        pass

    def restore(self, i: int, tensors: dict[str, torch.Tensor], pattern: Pattern) -> None:
        self.blocks[i].load_state_dict(tensors)


def model_identity(model: nn.Module, blocks: nn.ModuleList) -> dict[str, Any]:
    """Cheap identity of a model (no hashing of weights): class, where it was loaded from, size."""
    return {"class": type(model).__name__, "source": str(getattr(model, "name_or_path", "")),
            "blocks": len(blocks), "params": sum(p.numel() for p in model.parameters())}


def fingerprint(config: PruneConfig, device: torch.device, model_id: dict[str, Any], calib: torch.Tensor) -> dict[str, Any]:
    """What must be equal for a saved run to be resumed: every setting that changes the result."""
    run_only = {"work_dir", "resume", "stream", "offload_activations", "data_dir", "device"}
    ids = calib.detach().to("cpu", torch.int64).contiguous()
    return {
        "config": {k: v for k, v in config.to_dict().items() if k not in run_only},
        "device": device.type,
        "model": model_id,
        "calib": {"shape": list(ids.shape), "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()},
    }


def run_blocks(prefix: str, blocks: nn.ModuleList, io: Blocks, calib: torch.Tensor, config: PruneConfig,
               model_id: dict[str, Any], quiet: bool = False) -> tuple[dict[str, Any], WorkDir | None]:
    """Prune every block through ``io``; returns the pruning record and the work dir (if any) to remove
    once the caller's result is safe."""
    config.validate()
    device = resolve_device(config.device)
    store = torch.device("cpu") if config.offload_activations else device
    n_targets = check_shapes(blocks, prefix, config)
    work = WorkDir(config.work_dir, fingerprint(config, device, model_id, calib)) if config.work_dir else None
    state = work.start(config.resume) if work is not None else None
    torch.manual_seed(config.seed)

    t0 = time.perf_counter()
    if state is None:
        done, layers, block_seconds, before, ratios, t_scan, tune_errors = 0, [], [], 0.0, None, 0.0, []
        acts = io.capture(calib, config.batch_size, device, store)
        if config.dense_targets:
            acts.targets = list(acts.batches)  # block 0 sees the same inputs in both models
        t_capture = time.perf_counter() - t0
        if config.allocation == "owl":
            ratios = outlier_scan(prefix, blocks, io, acts, config, device, quiet)
            t_scan = time.perf_counter() - t0 - t_capture
    else:
        done, saved = state["done"], state["record"]
        layers, block_seconds, t_capture, before = saved["layers"], saved["blocks"], saved["capture"], saved["elapsed"]
        ratios, t_scan, tune_errors = saved.get("outlier_ratios"), saved.get("owl_scan", 0.0), saved.get("tune", [])
        raw = work.acts(done)
        acts = Activations([x.to(store) for x in raw["batches"]], to_device(raw["kwargs"], device),
                           None if raw.get("targets") is None else [x.to(store) for x in raw["targets"]])
        log.info("resuming from %s: %d of %d blocks already pruned", work.path, done, len(blocks))
    pattern = config.resolved_pattern()
    patterns = [pattern] * len(blocks) if ratios is None else allocate(ratios, pattern, config)
    for i in range(done):
        io.restore(i, work.block(i), patterns[i])

    def commit(k: int, block: dict[str, torch.Tensor] | None = None) -> None:
        record = {"capture": t_capture, "blocks": block_seconds, "layers": layers, "outlier_ratios": ratios,
                  "owl_scan": t_scan, "tune": tune_errors, "elapsed": before + time.perf_counter() - t0}
        work.commit(k, {"batches": acts.batches, "kwargs": acts.kwargs, "targets": acts.targets}, record, block)

    if work is not None and state is None:
        commit(0)
    bar = tqdm(range(done, len(blocks)), desc=f"prune {config.method} {pattern}", disable=quiet,
               unit="block", initial=done, total=len(blocks))
    for i in bar:
        tb = time.perf_counter()
        io.load(i, device)
        records, tuned = prune_block(blocks[i], f"{prefix}.{i}", acts, config, patterns[i], device)
        layers += [r.__dict__ for r in records]
        if tuned is not None:
            tune_errors.append(tuned)
        io.store(i, patterns[i])
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # so the block's time is its own, not the next one's
        block_seconds.append(time.perf_counter() - tb)
        if work is not None:
            commit(i + 1, blocks[i].state_dict())
        io.release(i)
        bar.set_postfix(err=f"{sum(r['recon_error'] for r in layers[-8:]) / min(8, len(layers)):.4f}")
        log.info("block %d done in %.1fs", i, block_seconds[-1])
    del acts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    record = {
        "device": str(device),
        "blocks": len(blocks),
        "targets": n_targets,
        "seconds": {"capture": t_capture, "owl_scan": t_scan, "blocks": block_seconds, "prune_total": before + time.perf_counter() - t0},
        "layers": layers,
        "sparsity": sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
        / sum(r["shape"][0] * r["shape"][1] for r in layers),
    }
    if tune_errors:  # relative block-output error before and after tuning, per block
        record["tune"] = [{"before": b, "after": a} for b, a in tune_errors]
    if ratios is not None:
        record["allocation"] = {"method": "owl", "lambda": config.owl_lambda, "m": config.owl_m,
                                "outlier_ratios": ratios, "sparsity": [p.sparsity for p in patterns]}
    if state is not None:
        record["resumed_from"] = done
    return record, work


def prune_model(model: nn.Module, calib: torch.Tensor, config: PruneConfig, quiet: bool = False) -> dict[str, Any]:
    """Prune ``model`` in place, block by block, on calibration windows ``calib`` ``[n, seqlen]``.

    Returns the pruning part of the run record (per-layer sparsity and reconstruction error, timings).
    With ``config.work_dir`` the run can be resumed after a kill; the work dir is removed when it ends.
    """
    config.validate()
    prefix, blocks = find_blocks(model)
    record, work = run_blocks(prefix, blocks, InPlaceBlocks(model, blocks), calib, config,
                              model_identity(model, blocks), quiet)
    if work is not None:
        work.remove()
    return record
