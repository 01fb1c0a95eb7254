"""Forward hooks that collect the calibration statistics a method declares (``Method.stats``).

``"xtx"``: the fp32 Gram XᵀX per distinct Linear input (O(d²)); ``"input_sq"``: the fp32 sum of x² per
input feature (O(d): all Wanda and OWL need). Linears that read the same tensor (q/k/v, gate/up)
share one entry, found on the first batch. With a :class:`DenseTap` (dense targets) each Gram also gets
XₚᵀX_d against the dense model's input to the same Linear.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from ..methods import STATISTICS, LayerStats
from ..models import find_linears
from .capture import StopForward, block_out


class DenseTap:
    """A dense copy of a block, run on the dense stream, keeping each Linear's input for the current batch
    and summing ‖X_dWᵀ‖² per Linear, so the pruned stream's hooks can pair their inputs with it."""

    def __init__(self, block: nn.Module, prefix: str, skip: list[str] | tuple[str, ...]) -> None:
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
                    raise StopForward

        return hook

    def start(self, names: list[str], stop_early: bool) -> None:
        """Record (from zero) the Linears ``names`` in the passes that follow, which end early once all
        of them have run if ``stop_early``."""
        self.names, self.stop_early = set(names), stop_early
        for n in names:
            self.out_sq[n] = 0.0

    def __call__(self, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """The dense block's output (raises :class:`StopForward` when stopping early)."""
        self.inputs.clear()
        return block_out(self.block(x, **kwargs))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.inputs.clear()


class StatsCollector:
    """Forward hooks accumulating the statistics ``wants`` per distinct Linear input.

    With ``stop_early`` the rest of a forward pass is skipped once every Linear has run.
    """

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device, wants: tuple[str, ...] | set[str],
                 tap: DenseTap | None = None, stop_early: bool = False) -> None:
        if unknown := set(wants) - set(STATISTICS):
            raise ValueError(f"unknown statistics {sorted(unknown)}; the engine collects {STATISTICS}")
        self.linears, self.device, self.wants = linears, device, set(wants)
        self.tap, self.stop_early = tap, stop_early
        self.owner: dict[str, str] = {}  # linear -> linear whose statistics it shares
        self.xtx: dict[str, torch.Tensor] = {}
        self.xtd: dict[str, torch.Tensor] = {}
        self.input_sq: dict[str, torch.Tensor] = {}
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
                raise StopForward

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if "input_sq" in self.wants:
            sq = x.square().sum(0)
            self.input_sq[name] = self.input_sq[name] + sq if name in self.input_sq else sq
        if "xtx" not in self.wants:
            return
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

    def get(self, name: str) -> LayerStats:
        own = self.owner[name]
        return LayerStats(self.xtx.get(own), self.input_sq.get(own))

    def paired(self, name: str) -> tuple[torch.Tensor | None, float | None]:
        """XₚᵀX_d and ‖X_dWᵀ‖² of ``name`` (``None``s without a dense tap)."""
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


class ErrorMeter:
    """Exact relative output error ‖X(W₀ − W₁)ᵀ‖² / ‖XW₀ᵀ‖² of pruned Linears on their dense inputs, for
    methods that collect no XᵀX: hooks on a dense copy of the block (run on the block's inputs) apply
    each pruned weight ``W₁`` to the same input as the dense ``W₀``. One extra pass of the dense block."""

    def __init__(self, dense: nn.Module, pruned: dict[str, nn.Linear], prefix: str,
                 skip: list[str] | tuple[str, ...]) -> None:
        self.dense = dense
        self.num = dict.fromkeys(pruned, 0.0)
        self.den = dict.fromkeys(pruned, 0.0)
        self._handles = [lin.register_forward_hook(self._hook(name, pruned[name]))
                         for name, lin in find_linears(dense, prefix, skip).items() if name in pruned]

    def _hook(self, name: str, pruned: nn.Linear) -> Callable:
        def hook(mod: nn.Linear, inp: tuple, _out: torch.Tensor) -> None:
            x = inp[0].reshape(-1, inp[0].shape[-1]).to(torch.float32)
            w0 = mod.weight.to(torch.float32)
            self.num[name] += float((x @ (w0 - pruned.weight.to(torch.float32)).T).square().sum())
            self.den[name] += float((x @ w0.T).square().sum())

        return hook

    def errors(self) -> dict[str, float]:
        for h in self._handles:
            h.remove()
        return {n: self.num[n] / max(self.den[n], 1e-30) for n in self.num}
