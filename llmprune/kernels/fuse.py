"""One Linear for several that read the same input (q/k/v, gate/up): their weights stacked by rows.

Every layout the kernels hold keeps each row (tile row) to itself, so stacking the packed tensors is the
packed form of the stacked weight: one call, one pass over the input, one thread split instead of three.
The kernel modules' own tensors then become views of their rows of the stack, so it costs no second copy;
plain ``nn.Linear`` weights are copied (views would make transformers refuse to save the model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .int4 import Int4Linear, Int4Weight
from .linear import SparseLinear


def _bias(mods: list[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(m.out_features, dtype=dtype)
                      for m in mods])


def _share(mods: list[nn.Module], fused: nn.Module, r: int) -> None:
    """Point each module's tensors at its rows of ``fused``'s (tile-row tensors have ``out_features / r`` rows)."""
    for name in ("values", "meta", "codes", "scale", "zero", "bias"):
        whole, start = getattr(fused, name, None), 0
        for m in mods:
            rows = m.out_features // (r if name in ("values", "meta", "codes") else 1)
            mine = getattr(m, name, None)
            if whole is not None and mine is not None and mine.dtype == whole.dtype:
                setattr(m, name, whole[start:start + rows])
            start += rows


def fuse_rows(mods: list[nn.Module]) -> nn.Module | None:
    """A module computing ``cat([m(x) for m in mods], -1)``, or None where their storage differs."""
    first = mods[0]
    if type(first) not in (nn.Linear, SparseLinear, Int4Linear) or any(type(m) is not type(first) for m in mods) \
            or any(m.in_features != first.in_features for m in mods):
        return None
    if type(first) is nn.Linear:
        fused = nn.Linear(first.in_features, sum(m.out_features for m in mods), bias=first.bias is not None,
                          device=first.weight.device, dtype=first.weight.dtype)
        if any((m.bias is None) != (first.bias is None) for m in mods):
            return None
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in mods]))
            if first.bias is not None:
                fused.bias.copy_(torch.cat([m.bias for m in mods]))
        return fused
    if type(first) is SparseLinear:
        same = all(m.layout == first.layout and m.values.dtype == first.values.dtype
                   and m.meta.shape[1] == first.meta.shape[1] for m in mods)
        # a bitmask's stride is its widest row + slack: zero-padded to the widest of all
        width = max(m.values.shape[1] for m in mods)
        if not same or first.layout.fmt != "bitmask" and any(m.values.shape[1] != width for m in mods):
            return None
        values = torch.cat([F.pad(m.values, (0, width - m.values.shape[1])) for m in mods])
        shape = (sum(m.out_features for m in mods), first.in_features)
        fused = SparseLinear(first.layout, values, torch.cat([m.meta for m in mods]), shape,
                             _bias(mods, first.values.dtype), first.table)
        _share(mods, fused, first.layout.r)
        return fused
    if type(first) is Int4Linear:
        if any(m.group_size != first.group_size or (m.meta is None) != (first.meta is None) for m in mods):
            return None
        sparse = first.meta is not None
        if sparse and any(m.layout != first.layout or m.meta.shape[1] != first.meta.shape[1] for m in mods):
            return None
        width = max(m.codes.shape[1] for m in mods)  # a bitmask's rows: padded to the widest (as values above)
        if any(m.codes.shape[1] != width for m in mods) and not (sparse and first.layout.fmt == "bitmask"):
            return None
        zeros = None
        if any(m.zero is not None for m in mods):  # a symmetric grid's zero is 8
            zeros = torch.cat([m.zero if m.zero is not None else torch.full_like(m.scale, 8, dtype=torch.uint8)
                               for m in mods])
        meta = None if first.meta is None else torch.cat([m.meta for m in mods])
        codes = torch.cat([F.pad(m.codes, (0, width - m.codes.shape[1])) for m in mods])
        w = Int4Weight(codes, torch.cat([m.scale for m in mods]), zeros, meta,
                       (sum(m.out_features for m in mods), first.in_features), first.group_size, first.layout)
        fused = Int4Linear(w, _bias(mods, torch.float32))
        _share(mods, fused, first.layout.r if sparse else 1)
        return fused
