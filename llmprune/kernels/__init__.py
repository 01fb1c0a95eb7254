"""Packed sparse weights and fast GPU kernels for llmprune's N:M and RxC:K patterns.

Importing this package needs neither triton nor CUDA: the Triton kernels are imported on first GPU use
and everything falls back to a pure-torch decompress-and-matmul path elsewhere. See ``README.md``.
"""

from .dispatch import DispatchTable, default_table
from .formats import Layout, PackedWeight, layout_for, pack, unpack
from .int4 import Int4Linear, Int4Weight
from .linear import HAS_TRITON, SparseLinear

__all__ = [
    "HAS_TRITON",
    "Int4Linear",
    "Int4Weight",
    "DispatchTable",
    "Layout",
    "PackedWeight",
    "SparseLinear",
    "default_table",
    "layout_for",
    "pack",
    "unpack",
]
