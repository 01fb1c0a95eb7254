"""``PruneConfig``: every choice of a pruning run, shared by the Python API and the CLI.

``PruneConfig.plan()`` validates it once and resolves it into the engine's :class:`~llmprune.engine.Plan`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .engine.plan import OwlPlan, Plan, RunOptions, resolve_device
from .errors import LLMPruneError
from .methods import METHODS
from .patterns import Pattern, parse_pattern
from .quant import parse_quant


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PruneConfig:
    """What to prune, how, and with which calibration data."""

    method: str = _opt("admm", "pruning method", choices=tuple(METHODS))
    sparsity: float | None = _opt(None, "fraction of weights removed; implied by N:M and RxC:K patterns (default 0.5)")
    pattern: str = _opt("unstructured", "'unstructured', 'N:M' (2:4, 4:8) or 'RxC:K' (4x4:8)")
    granularity: str = _opt("row", "unstructured comparison group: per output 'row' or whole 'layer'", choices=("row", "layer"))
    quant: str = _opt("none", "also quantize the kept weights onto a group grid (int4, int8; none: full precision); "
                              "admm and sparsegpt solve pattern and grid jointly, gptq quantizes only, wanda and "
                              "magnitude round to nearest; with --sparsity 0: quantization alone",
                      choices=("none", "int4", "int8"))
    group_size: int = _opt(128, "--quant: input columns sharing one fp16 scale (-1: one per output row); a multiple "
                                "of the pattern's group width (M of N:M, C of RxC:K)")
    sym: bool = _opt(False, "--quant: symmetric grid (a scale per group, zero fixed at the middle code) instead of the "
                            "default asymmetric one (scale and integer zero point; measured better: NOTES_admm.md §12)")
    allocation: str = _opt("uniform", "sparsity per decoder block: the same everywhere, or 'owl' (outlier-weighted: "
                                      "blocks with more outliers keep more weights; unstructured only)",
                           choices=("uniform", "owl"))
    owl_lambda: float = _opt(0.08, "OWL: block sparsities spread over a band of width 2*lambda around --sparsity")
    owl_m: float = _opt(5.0, "OWL: a weight is an outlier when its Wanda score exceeds m times its block's mean")
    skip: list[str] = _opt([], "glob patterns of target names to leave dense: Linear modules (e.g. "
                               "'*.mlp.down_proj') or fused expert tensors (all experts of '*.experts.down_proj')")
    expert_min_tokens: int = _opt(16, "an expert that the router sent fewer calibration tokens than this is "
                                      "pruned by magnitude (its statistics are too few to fit a weight update)")
    batch_experts: str = _opt("auto", "solve the experts of a fused MoE tensor in one batched call (admm; same "
                                      "result): auto = on CUDA, where it replaces E small solves; on CPU one by one "
                                      "measured faster (benchmarks/moe.py)", choices=("auto", "on", "off"))
    strict: bool = _opt(False, "refuse to run when a block holds a parameter of >= 1%% of its size that is not "
                               "pruned (instead of listing it in a warning and the run record)")
    calib: str = _opt("wikitext2", "calibration data: wikitext2, c4, ptb or a path to a .txt file")
    nsamples: int = _opt(128, "calibration windows")
    seqlen: int = _opt(2048, "tokens per calibration window")
    seed: int = _opt(0, "seed for window sampling and anything random")
    data_dir: str | None = _opt(None, "offline data folder laid out like shared/data (default: $LLMPRUNE_DATA)")
    device: str = _opt("auto", "compute device for one block at a time: auto, cpu, cuda, cuda:1, ...")
    batch_size: int = _opt(8, "calibration windows per block forward pass")
    offload_activations: bool = _opt(False, "keep calibration activations on the CPU between blocks")
    sequential: bool = _opt(False, "prune a block's Linears group by group in execution order (q/k/v, o, gate/up, "
                                   "down), each seeing the already-pruned ones' outputs; one extra pass per group")
    dense_targets: bool = _opt(False, "fit each pruned Linear, fed the pruned model's inputs, to the dense model's "
                                      "outputs (a second, dense activation stream), so every layer corrects the "
                                      "error upstream of it; implies --sequential (admm, sparsegpt)")
    tune_epochs: int = _opt(0, "after pruning a block, fine-tune its kept weights end to end (Adam, masks fixed) for "
                                  "this many passes over the calibration batches, towards the dense outputs; 0: off")
    tune_lr: float = _opt(3e-4, "Adam learning rate of --tune-epochs (3e-4 beat 1e-4 on SmolLM2 2:4)")
    method_options: dict[str, Any] = _opt({}, "options of the chosen method (see its config dataclass)")
    stream: bool = _opt(False, "read blocks lazily from the checkpoint on disk and write the result block by block, "
                               "so host memory holds about one block; needs --model DIR (safetensors) and --save")
    work_dir: str | None = _opt(None, "persist every finished block here so a killed run can be continued "
                                      "with --resume (removed when the run completes)")
    resume: bool = _opt(False, "continue the run saved in --work-dir from its last finished block "
                               "(starts afresh if there is none)")

    def resolved_pattern(self) -> Pattern:
        return parse_pattern(self.pattern, self.sparsity, self.granularity,
                             parse_quant(self.quant, self.group_size, self.sym))

    def method_config(self) -> Any:
        method = METHODS[self.method]
        unknown = set(self.method_options) - set(method.config_cls.__dataclass_fields__)
        if unknown:
            raise LLMPruneError(f"method {self.method} has no option(s) {', '.join(sorted(unknown))}")
        return method.config_cls(**self.method_options)

    def plan(self) -> Plan:
        """Refuse impossible settings before any work starts; the validated plan the engine runs."""
        self._check()
        device = resolve_device(self.device)
        return Plan(
            method=self.method, method_config=self.method_config(), pattern=self.resolved_pattern(),
            skip=tuple(self.skip), batch_size=self.batch_size, sequential=self.sequential,
            dense_targets=self.dense_targets, tune_epochs=self.tune_epochs, tune_lr=self.tune_lr,
            owl=OwlPlan(self.owl_lambda, self.owl_m) if self.allocation == "owl" else None,
            expert_min_tokens=self.expert_min_tokens, seed=self.seed,
            run=RunOptions(device, self.offload_activations, self.work_dir, self.resume, self.strict,
                           self.batch_experts == "on" or (self.batch_experts == "auto" and device.type == "cuda")),
        )

    def _check(self) -> None:
        if self.method not in METHODS:
            raise LLMPruneError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        self.resolved_pattern()
        self.method_config()
        if self.nsamples < 1 or self.seqlen < 2:
            raise LLMPruneError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")
        if self.batch_experts not in ("auto", "on", "off"):
            raise LLMPruneError(f"unknown batch_experts {self.batch_experts!r}; choose auto, on or off")
        if self.expert_min_tokens < 0:
            raise LLMPruneError(f"expert_min_tokens must be >= 0, got {self.expert_min_tokens}")
        if self.batch_size < 1:
            raise LLMPruneError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dense_targets and not METHODS[self.method].weight_update:
            raise LLMPruneError(f"--dense-targets needs a method that updates weights (admm, sparsegpt), not {self.method}")
        if self.allocation not in ("uniform", "owl"):
            raise LLMPruneError(f"unknown allocation {self.allocation!r}; choose uniform or owl")
        if self.allocation == "owl":
            if self.resolved_pattern().structured:
                raise LLMPruneError(f"--allocation owl needs unstructured sparsity; pattern {self.pattern} fixes "
                                    "every layer's sparsity")
            if self.owl_lambda < 0 or self.owl_m <= 0:
                raise LLMPruneError(f"need owl_lambda >= 0 and owl_m > 0, got {self.owl_lambda} and {self.owl_m}")
        quantized = self.resolved_pattern().quant is not None
        if METHODS[self.method].quantizes and not quantized:
            raise LLMPruneError(f"--method {self.method} quantizes: give it a grid with --quant int4 or int8")
        if quantized and self.tune_epochs:
            raise LLMPruneError("--tune-epochs trains kept weights off the --quant grid; use one or the other")
        if self.tune_epochs < 0 or self.tune_lr <= 0:
            raise LLMPruneError(f"need tune_epochs >= 0 and tune_lr > 0, got {self.tune_epochs} and {self.tune_lr}")
        if self.resume and not self.work_dir:
            raise LLMPruneError("--resume needs --work-dir (where the interrupted run saved its progress)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = self.resolved_pattern().sparsity
        return d
