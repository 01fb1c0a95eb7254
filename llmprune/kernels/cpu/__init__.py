"""Vectorised C++ kernels for packed pruned (and int4) weights on the CPU; see ``README.md`` beside this file."""

from .build import available, isa
from .ops import DENSE_FLOAT, SMALL_M, decode, linear, quantize_act, small_m_for, threads_used, weight_args

__all__ = ["DENSE_FLOAT", "SMALL_M", "available", "decode", "isa", "linear", "quantize_act", "small_m_for",
           "threads_used", "weight_args"]
