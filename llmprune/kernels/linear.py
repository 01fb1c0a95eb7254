"""``SparseLinear``: an inference ``nn.Linear`` whose weight stays packed in memory."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu, cusparselt
from .dispatch import DispatchTable, default_table, layout_key
from .formats import Layout, PackedWeight, layout_for, pack, unpack

HAS_TRITON = importlib.util.find_spec("triton") is not None
_HALF = (torch.float16, torch.bfloat16)
SUPPORTED = ("unstructured, N:M and RxC:K patterns (tiles of at most 32 weights) with float or int4 values, "
             "and int4 without sparsity")


def unsupported(pattern: object) -> str | None:
    """Why the kernel modules can't hold a weight pruned to ``pattern`` (a ``Pattern``), or None if they can."""
    quant = getattr(pattern, "quant", None)
    kind = getattr(pattern, "kind", None)
    if quant is not None and quant.bits == 4 and not pattern.structured and pattern.sparsity == 0:
        return None
    pruned = kind in ("nm", "tile") or kind == "unstructured" and pattern.sparsity > 0
    if (quant is None or quant.bits == 4) and pruned:
        try:
            layout_for(pattern)
            return None
        except ValueError:
            pass
    return f"the kernels run {SUPPORTED}, not {getattr(pattern, 'label', pattern)}"


def _triton():
    from . import triton_kernels  # imported on first GPU use: importing triton costs ~1 s

    return triton_kernels


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with W packed (see :mod:`kernels.formats`), dispatched by token count.

    On CUDA with fp16/bf16 inputs the :class:`~kernels.dispatch.DispatchTable` picks the Triton kernel,
    cuSPARSELt (2:4) or decompress-then-cuBLAS for ``M = x.numel() // in_features``; on the CPU the C++
    kernels (:mod:`kernels.cpu`) run it; anywhere else (CUDA fp32, no C++ build, the unstructured bitmask on
    CUDA, which has no Triton kernel) the weight is decompressed with pure torch for the call.
    """

    def __init__(
        self,
        layout: Layout,
        values: torch.Tensor,
        meta: torch.Tensor,
        shape: tuple[int, int],
        bias: torch.Tensor | None = None,
        table: DispatchTable | None = None,
        use_cusparselt: bool = False,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.out_features, self.in_features = shape
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", bias)
        self.table = table or default_table()
        # Opt-in: its GPU test failed on an H100 (see cusparselt.py); it also keeps its own compressed copy
        # (another 0.56x of dense). A table must name it as well.
        self.use_cusparselt = use_cusparselt and layout.fmt == "2:4"
        self._cslt: cusparselt.CusparseltWeight | None = None

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        pattern: object,
        bias: torch.Tensor | None = None,
        table: DispatchTable | None = None,
        use_cusparselt: bool = False,
        mask: torch.Tensor | None = None,
    ) -> SparseLinear:
        """Pack a dense weight already pruned to ``pattern`` (a ``Pattern`` or a string like ``"2:4"``), at the
        positions of the pruner's ``mask`` when given."""
        weight = weight.detach()
        packed = pack(weight, layout_for(pattern), mask)
        bias = None if bias is None else bias.detach().clone()
        module = cls(packed.layout, packed.values, packed.meta, packed.shape, bias, table, use_cusparselt)
        if weight.is_cuda and module._wants_cusparselt(weight.dtype):
            module._cslt = cusparselt.CusparseltWeight(weight.contiguous())  # prepared once, at build
        return module

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.layout, self.values, self.meta, (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        fmt = layout_key(self.layout)
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, format={fmt}"

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        self._cslt = None  # device/dtype-specific; rebuilt on demand
        return super()._apply(fn, recurse)

    def _wants_cusparselt(self, dtype: torch.dtype) -> bool:
        shape = (self.out_features, self.in_features)
        return (
            self.use_cusparselt
            and cusparselt.available()
            and cusparselt.supports(shape, dtype)
            and any(k == "cusparselt" for _, k in self.table.rules_for(self.layout, *shape))
        )

    def kernel_for(self, x: torch.Tensor) -> str:
        """The path ``forward`` takes for input ``x``: "triton", "cusparselt", "dense", "cpu" or "torch"."""
        m = x.numel() // self.in_features
        if x.device.type == "cpu":
            return "cpu" if m and cpu.available() else "torch"
        if not x.is_cuda or x.dtype != self.values.dtype or x.dtype not in _HALF or m == 0 \
                or self.layout.fmt == "bitmask":
            return "torch"
        kernel = self.table.choose(self.layout, self.out_features, self.in_features, m)
        if kernel == "cusparselt" and not self._wants_cusparselt(x.dtype):
            kernel = "dense"
        if kernel == "triton" and not HAS_TRITON:
            kernel = "dense"
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = self.kernel_for(x)
        if kernel == "cpu":
            y = cpu.linear(x2, self.packed, self.bias)
        elif kernel == "triton":
            y = _triton().sparse_mm(x2, self.packed, self.bias)
        elif kernel == "cusparselt":
            if self._cslt is None:
                self._cslt = cusparselt.CusparseltWeight(self._dense())
            y = self._cslt.linear(x2, self.bias)
        else:
            w = self._dense() if kernel == "dense" else unpack(self.packed)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x2, w.to(x.dtype), bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _dense(self) -> torch.Tensor:
        return _triton().unpack(self.packed) if HAS_TRITON else unpack(self.packed)
