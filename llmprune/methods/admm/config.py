from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ADMMConfig:
    """Options of the ADMM weight update (defaults: Boža 2024)."""

    rho: float = field(default=1.0, metadata={"help": "ADMM penalty ρ of the ridge solve (XᵀX + ρI)"})
    iters: int = field(default=20, metadata={"help": "ADMM iterations"})
    ramp_steps: int = field(
        default=15, metadata={"help": "iterations over which sparsity ramps up cubically (0: full mask at once)"}
    )
    percdamp: float = field(default=0.1, metadata={"help": "damping added to XᵀX, as a fraction of its mean diagonal"})
