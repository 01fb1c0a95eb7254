"""Watchers (:func:`llmprune.targets.watch`) that collect the calibration statistics a method declares
(``Method.stats``).

``"xtx"``: the fp32 Gram XᵀX per distinct target input (O(d²)); ``"input_sq"``: the fp32 sum of x² per
input feature (O(d): all Wanda and OWL need). Linears that read the same tensor (q/k/v, gate/up)
share one entry, found on the first batch; an expert's statistics come from the tokens routed to it.
With a :class:`DenseTap` (dense targets) each Linear's Gram also gets XₚᵀX_d against the dense model's
input to the same Linear. Experts are not paired: the dense and pruned streams route tokens differently,
so their rows do not correspond, and experts are fitted to their own inputs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..methods import STATISTICS, LayerStats
from ..targets import Target, find_targets, watch
from .capture import StopForward, block_out


class DenseTap:
    """A dense copy of a block, run on the dense stream, keeping each Linear's input for the current batch
    and summing ‖X_dWᵀ‖² per Linear, so the pruned stream's watchers can pair their inputs with it."""

    def __init__(self, block: nn.Module, prefix: str, skip: list[str] | tuple[str, ...]) -> None:
        self.block = copy.deepcopy(block)
        self.inputs: dict[str, torch.Tensor] = {}
        self.out_sq: dict[str, float] = {}
        self.names: set[str] = set()
        self.stop_early = False
        self.targets = {n: t for n, t in find_targets(self.block, prefix, skip).items() if t.expert is None}
        self._remove = watch(self.targets, self._input)

    def _input(self, name: str, x: torch.Tensor) -> None:
        if name in self.names:
            self.inputs[name] = x
            y = x.to(torch.float32) @ self.targets[name].weight.to(torch.float32).T
            self.out_sq[name] = self.out_sq.get(name, 0.0) + float(y.square().sum())
            if self.stop_early and self.names <= self.inputs.keys():
                raise StopForward

    def start(self, names: list[str], stop_early: bool) -> None:
        """Record (from zero) the Linears among ``names`` in the passes that follow, which end early once
        all of them have run if ``stop_early``."""
        self.names, self.stop_early = set(names) & self.targets.keys(), stop_early
        for n in names:
            self.out_sq[n] = 0.0

    def __call__(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The dense block's output (raises :class:`StopForward` when stopping early)."""
        self.inputs.clear()
        return block_out(self.block(x, **kwargs))

    def remove(self) -> None:
        self._remove()
        self.inputs.clear()


class StatsCollector:
    """Watchers accumulating the statistics ``wants`` per distinct target input, and the rows each target saw.

    With ``stop_early`` the rest of a forward pass is skipped once every target has run (a batch that
    routes no token to some expert runs to the end).
    """

    def __init__(self, targets: dict[str, Target], device: torch.device, wants: tuple[str, ...] | set[str],
                 tap: DenseTap | None = None, stop_early: bool = False) -> None:
        if unknown := set(wants) - set(STATISTICS):
            raise ValueError(f"unknown statistics {sorted(unknown)}; the engine collects {STATISTICS}")
        self.targets, self.device, self.wants = targets, device, set(wants)
        self.tap, self.stop_early = tap, stop_early
        self.owner: dict[str, str] = {}  # target -> target whose statistics it shares
        self.rows: dict[str, int] = dict.fromkeys(targets, 0)  # input rows (tokens) each target saw
        self.xtx: dict[str, torch.Tensor] = {}
        self.xtd: dict[str, torch.Tensor] = {}
        self.input_sq: dict[str, torch.Tensor] = {}
        if tap is not None:
            tap.start(list(targets), stop_early)
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}  # holds inputs so their memory is not reused
        self._fired: set[str] = set()
        self.remove = watch(targets, self._input)

    def _input(self, name: str, x: torch.Tensor) -> None:
        self._fired.add(name)
        self.rows[name] += x.numel() // x.shape[-1]
        if name not in self.owner:
            sig = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            self.owner[name] = self._seen.setdefault(sig, (x, name))[1]
        if self.owner[name] == name:
            self._accumulate(name, x)
        if self.stop_early and self._fired == self.targets.keys():
            raise StopForward

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if "input_sq" in self.wants:
            sq = x.square().sum(0)
            self.input_sq[name] = self.input_sq[name] + sq if name in self.input_sq else sq
        if "xtx" not in self.wants:
            return
        if name not in self.xtx:
            self.xtx[name] = torch.zeros(x.shape[1], x.shape[1], device=self.device, dtype=torch.float32)
            if name in self.tap_names:
                self.xtd[name] = torch.zeros_like(self.xtx[name])
        self.xtx[name].addmm_(x.T, x)
        if name in self.tap_names:
            self.xtd[name].addmm_(x.T, self.tap.inputs[name].reshape(-1, x.shape[1]).to(torch.float32))

    def end_batch(self) -> None:
        self._seen.clear()
        self._fired.clear()

    @property
    def tap_names(self) -> set[str]:
        return set() if self.tap is None else self.tap.names

    def get(self, name: str) -> LayerStats:
        """``name``'s statistics (``None``s for an expert no calibration token reached)."""
        own = self.owner.get(name)
        return LayerStats(self.xtx.get(own), self.input_sq.get(own))

    def paired(self, name: str) -> tuple[torch.Tensor | None, float | None]:
        """XₚᵀX_d and ‖X_dWᵀ‖² of ``name`` (``None``s without a dense tap, and for experts)."""
        if name not in self.tap_names:
            return None, None
        return self.xtd[self.owner[name]], self.tap.out_sq[name]

    def groups(self) -> list[list[str]]:
        """Targets grouped by shared input, in execution order; targets that never ran come last, alone."""
        out: dict[str, list[str]] = {}
        for name, own in self.owner.items():
            out.setdefault(own, []).append(name)
        return list(out.values()) + [[n] for n in self.targets if n not in self.owner]


class ErrorMeter:
    """Exact relative output error ‖X(W₀ − W₁)ᵀ‖² / ‖XW₀ᵀ‖² of pruned targets on their dense inputs, for
    methods that collect no XᵀX: watchers on a dense copy of the block (run on the block's inputs) apply
    each pruned weight ``W₁`` to the same input as the dense ``W₀``. One extra pass of the dense block."""

    def __init__(self, dense: nn.Module, pruned: dict[str, Target], prefix: str,
                 skip: list[str] | tuple[str, ...]) -> None:
        self.dense, self.pruned = dense, pruned
        self.num = dict.fromkeys(pruned, 0.0)
        self.den = dict.fromkeys(pruned, 0.0)
        self.originals = {n: t for n, t in find_targets(dense, prefix, skip).items() if n in pruned}
        self._remove = watch(self.originals, self._input)

    def _input(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        w0 = self.originals[name].weight.to(torch.float32)
        self.num[name] += float((x @ (w0 - self.pruned[name].weight.to(torch.float32)).T).square().sum())
        self.den[name] += float((x @ w0.T).square().sum())

    def errors(self) -> dict[str, float]:
        """Per target; NaN for one that saw no input (an expert no token reached)."""
        self._remove()
        return {n: self.num[n] / self.den[n] if self.den[n] > 0 else float("nan") for n in self.num}
