from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SparseGPTConfig:
    """Options of SparseGPT (defaults: Frantar & Alistarh 2023)."""

    blocksize: int = field(
        default=128, metadata={"help": "columns per lazy-update block; the mask is chosen block by block"}
    )
    percdamp: float = field(
        default=0.01, metadata={"help": "damping added to XᵀX, as a fraction of its mean diagonal"}
    )
