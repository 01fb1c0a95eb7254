"""``Plan``: a validated pruning run, what the engine executes.

``PruneConfig.plan()`` (the user's settings) resolves into one, once; the engine never sees the
user-facing config. What changes the result lives in the plan's own fields and is the resume
fingerprint; how the run is carried out (device, offloading, work dir) lives in :class:`RunOptions`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..errors import LLMPruneError
from ..methods import METHODS, Method
from ..patterns import Pattern


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LLMPruneError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LLMPruneError(f"device {device} requested but CUDA is not available")
    return dev


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out; none of it changes the pruned weights."""

    device: torch.device = torch.device("cpu")
    offload_activations: bool = False
    work_dir: str | None = None
    resume: bool = False
    strict: bool = False
    batch_experts: bool = False  # solve a fused tensor's experts in one call (same result, other speed)


@dataclass(frozen=True)
class OwlPlan:
    lam: float
    m: float


@dataclass(frozen=True)
class Plan:
    """Everything that determines the pruned weights, validated (see ``PruneConfig`` for the meanings)."""

    method: str
    method_config: Any
    pattern: Pattern
    skip: tuple[str, ...] = ()
    batch_size: int = 8
    sequential: bool = False
    dense_targets: bool = False
    tune_epochs: int = 0
    tune_lr: float = 3e-4
    owl: OwlPlan | None = None
    expert_min_tokens: int = 16
    seed: int = 0
    run: RunOptions = field(default_factory=RunOptions)

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def stats(self) -> tuple[str, ...]:
        """The statistics to collect: the method's own, plus XᵀX for dense targets."""
        return tuple(sorted(set(self.spec.stats) | ({"xtx"} if self.dense_targets else set())))

    def fingerprint(self) -> dict[str, Any]:
        """What a saved run must share with this one to be resumed: every field but ``run``, and the device kind."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"}
        out["method_config"] = asdict(self.method_config)
        out["pattern"] = asdict(self.pattern)
        out["owl"] = None if self.owl is None else asdict(self.owl)
        out["skip"] = list(self.skip)
        return {"plan": out, "device": self.run.device.type}
