"""The layer-streaming engine: one decoder block on the compute device at a time.

1. Capture the inputs of block 0 (hidden states plus every keyword argument the block needs) by
   running the model up to block 0 and stopping there.
2. For each block: move it to the device, stream the calibration batches through it while forward
   hooks accumulate XᵀX (fp32) per distinct Linear input, prune every Linear with the chosen method,
   re-run the pruned block to produce the next block's inputs, move it back.

Linears that read the same tensor (q/k/v, gate/up) share one XᵀX, found on the first batch.
Peak device memory is about one block + its XᵀX matrices + the activations (on the host with
``offload_activations``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import PruneConfig
from .errors import LLMPruneError
from .methods import METHODS, reconstruction_error
from .models import find_blocks, find_linears, move_non_block_modules, to_device

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the block-0 hook: nothing after the first block needs to run during capture."""


@dataclass
class Activations:
    """Calibration hidden states between blocks, batched, plus the block kwargs per batch size."""

    batches: list[torch.Tensor]
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)

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
    acts = Activations([])
    home = next(blocks[0].parameters()).device

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        acts.batches.append(hidden.to(store))
        acts.kwargs.setdefault(hidden.shape[0], {k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    move_non_block_modules(model, blocks, device)
    blocks[0].to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        blocks[0].to(home)
        move_non_block_modules(model, blocks, home)
    return acts


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class XtXCollector:
    """Forward hooks accumulating XᵀX per distinct Linear input; Linears fed the same tensor share one."""

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device) -> None:
        self.linears = linears
        self.device = device
        self.owner: dict[str, str] = {}  # linear -> linear whose XᵀX it shares
        self.xtx: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}  # holds inputs so their memory is not reused
        self._handles = [lin.register_forward_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_mod: nn.Module, inp: tuple, _out: Any) -> None:
            x = inp[0]
            if name not in self.owner:
                sig = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
                self.owner[name] = self._seen.setdefault(sig, (x, name))[1]
            if self.owner[name] != name:
                return
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in self.xtx:
                self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], device=self.device, dtype=torch.float32)
            self.xtx[name].addmm_(x.T, x)

        return hook

    def end_batch(self) -> None:
        self._seen.clear()

    def get(self, name: str) -> torch.Tensor:
        return self.xtx[self.owner[name]]

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
def run_block(block: nn.Module, acts: Activations, device: torch.device, replace: bool, collector: XtXCollector | None = None) -> None:
    """Stream every batch through ``block``; with ``replace`` the outputs become the next inputs."""
    for j, x in enumerate(acts.batches):
        out = _block_out(block(x.to(device), **acts.kwargs_for(x)))
        if collector is not None:
            collector.end_batch()
        if replace:
            acts.batches[j] = out.to(x.device)


@dataclass
class LayerRecord:
    name: str
    shape: list[int]
    sparsity: float
    recon_error: float
    seconds: float


def prune_linear(name: str, lin: nn.Linear, xtx: torch.Tensor, config: PruneConfig) -> LayerRecord:
    """Apply the configured method to one Linear in place; checks numerics with the layer's name."""
    t0 = time.perf_counter()
    method = METHODS[config.method]
    if not torch.isfinite(xtx).all():
        raise LLMPruneError(f"{name}: calibration statistics XᵀX contain NaN/Inf (overflow in the activations?)")
    w0 = lin.weight.data.to(torch.float32).clone()
    try:
        result = method.fn(w0.clone(), xtx if method.needs_xtx else None, config.resolved_pattern(), config.method_config())
    except (FloatingPointError, torch.linalg.LinAlgError) as e:
        raise LLMPruneError(f"{name}: {config.method} failed numerically: {e}") from e
    if not torch.isfinite(result.weight).all():
        raise LLMPruneError(f"{name}: {config.method} produced NaN/Inf weights")
    lin.weight.data.copy_(result.weight.to(lin.weight.dtype))
    sparsity = float((lin.weight.data == 0).float().mean())
    err = reconstruction_error(w0, lin.weight.data.to(torch.float32), xtx)
    return LayerRecord(name, list(lin.weight.shape), sparsity, err, time.perf_counter() - t0)


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
def prune_block(block: nn.Module, prefix: str, acts: Activations, config: PruneConfig, device: torch.device) -> list[LayerRecord]:
    """Prune every target Linear of one block (already on ``device``) and advance the activations."""
    linears = find_linears(block, prefix, config.skip)
    collector = XtXCollector(linears, device)
    try:
        run_block(block, acts, device, replace=False, collector=collector)
    finally:
        collector.remove()
    records = [prune_linear(name, lin, collector.get(name), config) for name, lin in linears.items()]
    del collector
    run_block(block, acts, device, replace=True)
    return records


def prune_model(model: nn.Module, calib: torch.Tensor, config: PruneConfig, quiet: bool = False) -> dict[str, Any]:
    """Prune ``model`` in place, block by block, on calibration windows ``calib`` ``[n, seqlen]``.

    Returns the pruning part of the run record (per-layer sparsity and reconstruction error, timings).
    """
    config.validate()
    device = resolve_device(config.device)
    store = torch.device("cpu") if config.offload_activations else device
    prefix, blocks = find_blocks(model)
    n_targets = check_shapes(blocks, prefix, config)
    home = next(blocks[0].parameters()).device  # blocks visit `device` one at a time and come back here
    torch.manual_seed(config.seed)

    t0 = time.perf_counter()
    acts = capture_inputs(model, blocks, calib, config.batch_size, device, store)
    t_capture = time.perf_counter() - t0
    layers: list[LayerRecord] = []
    block_seconds: list[float] = []
    bar = tqdm(range(len(blocks)), desc=f"prune {config.method} {config.resolved_pattern()}", disable=quiet, unit="block")
    for i in bar:
        tb = time.perf_counter()
        blocks[i].to(device)
        layers += prune_block(blocks[i], f"{prefix}.{i}", acts, config, device)
        blocks[i].to(home)
        block_seconds.append(time.perf_counter() - tb)
        bar.set_postfix(err=f"{sum(r.recon_error for r in layers[-8:]) / min(8, len(layers)):.4f}")
        log.info("block %d done in %.1fs", i, block_seconds[-1])
    del acts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "device": str(device),
        "blocks": len(blocks),
        "targets": n_targets,
        "seconds": {"capture": t_capture, "blocks": block_seconds, "prune_total": time.perf_counter() - t0},
        "layers": [r.__dict__ for r in layers],
        "sparsity": sum(r.sparsity * r.shape[0] * r.shape[1] for r in layers) / sum(r.shape[0] * r.shape[1] for r in layers),
    }
