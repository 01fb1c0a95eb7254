from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import LLMPruneError


@dataclass
class ADMMConfig:
    """Options of the ADMM weight update.

    Defaults are the variant that won on single-layer reconstruction (benchmarks/NOTES_admm.md):
    a longer ramp, ρ growing from ``rho_start`` to ``rho`` during it, and a final conjugate-gradient
    solve on the frozen mask. :meth:`paper` gives Boža 2024 exactly.
    """

    iters: int = field(default=30, metadata={"help": "ADMM iterations; the first ramp_steps of them choose the mask"})
    ramp_steps: int = field(
        default=30, metadata={"help": "iterations over which sparsity ramps up cubically (0: full mask at once)"}
    )
    rho: float = field(
        default=1.0, metadata={"help": "ADMM penalty ρ of the ridge solve (XᵀX + ρI) once the ramp ends"}
    )
    rho_start: float = field(
        default=0.05, metadata={"help": "ρ at the first iteration, raised geometrically to rho over the ramp"}
    )
    rho_updates: int = field(
        default=6, metadata={"help": "times ρ is raised during the ramp, one Cholesky each (0: constant rho)"}
    )
    final_cg_iters: int = field(
        default=10,
        metadata={"help": "conjugate-gradient iterations re-solving the kept weights on the final mask (0: none)"},
    )
    percdamp: float = field(
        default=0.1, metadata={"help": "damping added to XᵀX, as a fraction of its mean diagonal"}
    )
    quant_from: int = field(
        default=0, metadata={"help": "with --quant: first iteration whose projection also rounds onto the grid "
                                     "(Π_quant ∘ Π_pattern); earlier ones project onto the pattern only"}
    )
    sweep_percdamp: float = field(
        default=0.01, metadata={"help": "with --quant: damping of the final GPTQ sweep that rounds the kept weights "
                                        "onto the grid on the final mask, with error feedback"}
    )
    grid_rounds: int = field(
        default=2, metadata={"help": "with --quant: rounds of coordinate descent on the codes plus a scale refit "
                                     "after the sweep (methods/grid_refine.py; 0: none)"}
    )

    def __post_init__(self) -> None:
        if min(self.iters, self.ramp_steps, self.rho_updates, self.final_cg_iters, self.grid_rounds) < 0:
            raise LLMPruneError("admm: iters, ramp_steps, rho_updates, final_cg_iters and grid_rounds must be >= 0")
        if self.rho <= 0 or self.rho_start <= 0 or self.percdamp < 0 or self.sweep_percdamp < 0 or self.quant_from < 0:
            raise LLMPruneError("admm: rho and rho_start must be > 0; percdamp, sweep_percdamp and quant_from >= 0")

    @classmethod
    def paper(cls) -> ADMMConfig:
        """The published variant: constant ρ = 1, 20 iterations, 15-step ramp, no final solve."""
        return cls(iters=20, ramp_steps=15, rho=1.0, rho_start=1.0, rho_updates=0, final_cg_iters=0, percdamp=0.1)
