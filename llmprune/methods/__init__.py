"""Pruning methods, one folder each; ``METHODS`` is the registry the engine and CLI read."""

from .admm import ADMMConfig, admm_prune
from .base import STATISTICS, LayerStats, Method, PruneResult
from .objectives import dense_target, paired_error, reconstruction_error
from .gptq import GPTQConfig, gptq_prune
from .magnitude import MagnitudeConfig, magnitude_prune
from .sparsegpt import SparseGPTConfig, sparsegpt_prune
from .wanda import WandaConfig, wanda_prune

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("admm", ADMMConfig, admm_prune, batched=True, help="ADMM weight update with gradual mask (Boža 2024)"),
        Method(
            "sparsegpt", SparseGPTConfig, sparsegpt_prune, help="OBS column-block update (Frantar & Alistarh 2023)"
        ),
        Method("gptq", GPTQConfig, gptq_prune, quantizes=True,
               help="GPTQ: round onto the --quant grid with error feedback, magnitude's support (Frantar et al. 2023)"),
        Method("wanda", WandaConfig, wanda_prune, stats=("input_sq",), weight_update=False, help="|W|·‖x‖ scores, no weight update (Sun et al. 2023)"),
        Method("magnitude", MagnitudeConfig, magnitude_prune, stats=(), weight_update=False, help="|W| scores, data-free"),
    )
}

__all__ = ["METHODS", "STATISTICS", "LayerStats", "MagnitudeConfig", "Method", "PruneResult", "dense_target", "paired_error", "reconstruction_error"]
