"""``FinetuneConfig``: every choice of a sparse fine-tuning run (API and ``python -m llmprune finetune``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LLMPruneError

MODES = ("masked", "admm", "sr-ste")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class FinetuneConfig:
    """How to recover a pruned model by training (NxMTransformer ADMM, SR-STE, masked + distillation)."""

    mode: str = _opt("masked", "masked: train kept weights, masks fixed; admm: NxMTransformer (W = Z on the pattern, "
                               "then hard-prune and masked); sr-ste: straight-through with sparse-refined decay, "
                               "mask re-selected every step", choices=MODES)
    train: str = _opt("wikitext2", "training text: wikitext2 (offline: its valid split, never the test text), "
                                   "c4, ptb or a .txt path")
    tokens: int = _opt(65536, "training tokens (steps = tokens / (batch_size * processes * grad_accum * seqlen))")
    seqlen: int = _opt(512, "tokens per training window")
    batch_size: int = _opt(4, "windows per micro-batch and process")
    grad_accum: int = _opt(1, "micro-batches per optimiser step")
    lr: float = _opt(1e-4, "AdamW peak learning rate (linear warm-up, then cosine to 0)")
    warmup: float = _opt(0.05, "fraction of the steps spent warming up")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay")
    ce: float = _opt(1.0, "weight of the next-token cross-entropy")
    kd: float = _opt(0.0, "weight of the KL divergence to the dense teacher's logits (needs a teacher)")
    kd_temperature: float = _opt(2.0, "softmax temperature of the KD loss")
    squarehead: float = _opt(0.0, "weight of SquareHead: per-layer MSE to the teacher's hidden states, each "
                                  "normalised by the teacher's (needs a teacher)")
    admm_rho: float = _opt(1e-3, "admm: initial penalty rho of rho/2 ||W - Z + U||^2")
    admm_rho_growth: float = _opt(1.3, "admm: rho is multiplied by this at every projection")
    admm_every: int = _opt(8, "admm: optimiser steps between projections Z = P(W + U) and dual updates")
    admm_hard_prune: float = _opt(0.6, "admm: fraction of the steps after which W is hard-pruned to Z and "
                                        "training goes on masked")
    srste_decay: float = _opt(2e-4, "sr-ste: sparse-refined decay lambda on the pruned positions")
    val_fraction: float = _opt(0.1, "fraction of the training windows held out for validation")
    val_max: int = _opt(32, "at most this many validation windows (a validation pass costs their forward)")
    eval_every: int = _opt(20, "optimiser steps between validation passes (and checkpoints with --work-dir)")
    patience: int = _opt(0, "stop after this many validations without improvement (0: never stop early)")
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass (less memory)")
    fsdp: bool = _opt(False, "under a distributed launch, shard the model with torch FSDP2 (one unit per decoder "
                             "block) instead of replicating it (DDP); also on with accelerate launch --use_fsdp")
    autocast: str = _opt("auto", "mixed precision on CUDA: auto (bf16 if supported), bf16, fp16 or off",
                         choices=("auto", "bf16", "fp16", "off"))
    seed: int = _opt(0, "seed for the window order and anything random")
    device: str = _opt("auto", "compute device: auto, cpu, cuda, ...")
    data_dir: str | None = _opt(None, "offline data folder laid out like shared/data (default: $LLMPRUNE_DATA)")
    work_dir: str | None = _opt(None, "checkpoint training state here every --eval-every steps; --resume continues")
    resume: bool = _opt(False, "continue the run saved in --work-dir")

    def check(self) -> None:
        """Refuse impossible settings before any work."""
        if self.mode not in MODES:
            raise LLMPruneError(f"unknown finetune mode {self.mode!r}; choose {', '.join(MODES)}")
        ints = {"tokens": self.tokens, "seqlen": self.seqlen - 1, "batch_size": self.batch_size,
                "grad_accum": self.grad_accum, "eval_every": self.eval_every, "admm_every": self.admm_every,
                "val_max": self.val_max}
        if bad := [k for k, v in ints.items() if v < 1]:
            raise LLMPruneError(f"finetune: {bad[0]} is too small ({getattr(self, bad[0])})")
        if self.lr <= 0 or not 0 <= self.warmup < 1 or not 0 < self.val_fraction < 1 or self.patience < 0:
            raise LLMPruneError("finetune: need lr > 0, 0 <= warmup < 1, 0 < val_fraction < 1, patience >= 0")
        if min(self.ce, self.kd, self.squarehead) < 0 or self.ce + self.kd + self.squarehead == 0:
            raise LLMPruneError("finetune: loss weights must be >= 0 and not all 0")
        if self.admm_rho <= 0 or self.admm_rho_growth < 1 or not 0 < self.admm_hard_prune <= 1:
            raise LLMPruneError("finetune: need admm_rho > 0, admm_rho_growth >= 1, 0 < admm_hard_prune <= 1")
        if self.resume and not self.work_dir:
            raise LLMPruneError("--resume needs --work-dir")

    @property
    def needs_teacher(self) -> bool:
        return self.kd > 0 or self.squarehead > 0

    def steps(self, processes: int = 1) -> int:
        """Optimiser steps for the token budget (``processes`` data-parallel processes share it)."""
        return max(1, self.tokens // (self.batch_size * processes * self.grad_accum * self.seqlen))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
