"""llmprune: post-training pruning for large language models (ADMM, SparseGPT, Wanda, magnitude)."""

__version__ = "0.1.0"

from .api import PruneResult, evaluate, prune, prune_checkpoint  # noqa: E402
from .config import PruneConfig  # noqa: E402
from .errors import LLMPruneError  # noqa: E402
from .export import hf as _hf  # noqa: E402,F401  (registers quant_method "llmprune" with transformers)
from .finetune import FinetuneConfig, FinetuneResult, finetune  # noqa: E402
from .models import load_model  # noqa: E402
from .tasks import zero_shot  # noqa: E402


def load(path: str, **kwargs):  # noqa: ANN201
    """Load a checkpoint saved by llmprune (dense or compressed); see ``llmprune.export.load``."""
    from .export import load as _load

    return _load(path, **kwargs)


__all__ = ["FinetuneConfig", "FinetuneResult", "PruneConfig", "PruneResult", "LLMPruneError", "finetune", "evaluate", "load", "load_model", "prune", "prune_checkpoint", "zero_shot", "__version__"]
