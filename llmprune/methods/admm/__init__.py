"""ADMM weight update for pruning (Boža 2024, arXiv 2401.02938)."""

from .config import ADMMConfig
from .prune import admm_prune

__all__ = ["ADMMConfig", "admm_prune"]
