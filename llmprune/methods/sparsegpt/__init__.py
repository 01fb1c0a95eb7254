"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774)."""

from .config import SparseGPTConfig
from .prune import sparsegpt_prune

__all__ = ["SparseGPTConfig", "sparsegpt_prune"]
