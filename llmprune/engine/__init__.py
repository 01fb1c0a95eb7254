"""The layer-streaming engine: one decoder block on the compute device at a time.

1. ``capture``: the inputs of block 0 and every block's keyword arguments, by running the model with
   each block's forward swapped for a catcher.
2. ``run``: for each block, bring it to the device, stream the calibration batches through it while
   ``statistics`` hooks collect what the method declares (XᵀX, input norms), prune every Linear
   (``block``), re-run the pruned block to produce the next block's inputs, send it away.
3. ``sources``: where blocks come from and go to (a model in memory; a checkpoint on disk, streamed).
   ``workdir``: every finished block persisted so a killed run resumes.

The engine executes a :class:`Plan` (``PruneConfig.plan()``), never the user-facing config. Peak device
memory is about one block + its statistics + the activations (on the host with ``offload_activations``).
"""

from .capture import Activations, capture_blocks, capture_inputs
from .plan import Plan, RunOptions, resolve_device
from .run import EngineResult, check_shapes, model_identity, run_blocks
from .sources import Blocks, InPlaceBlocks, StreamBlocks
from .statistics import StatsCollector

__all__ = ["Activations", "Blocks", "EngineResult", "InPlaceBlocks", "Plan", "RunOptions", "StatsCollector",
           "StreamBlocks", "capture_blocks", "capture_inputs", "check_shapes", "model_identity", "resolve_device",
           "run_blocks"]
