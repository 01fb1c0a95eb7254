"""What llmprune prunes in a decoder block, and what it leaves.

A *target* is one 2-D weight matrix seen as ``[out, in]``: an ``nn.Linear``'s weight, or one expert's
slice of transformers' fused 3-D experts (``mlp.experts.gate_up_proj [E, 2I, H]``; gpt-oss stores
``[E, H, 2I]``, input first, which the experts module declares as ``is_transposed``). N:M groups always run
along the input dimension. Routers (Linears beside the experts with at most E outputs) stay dense.

Inputs of expert targets are the tokens the router sends to that expert: while a :func:`watch` is active,
the experts module runs :func:`_routed_forward`, the same per-expert loop as transformers' eager code
built from the module's own declared layout (``is_transposed``, ``has_bias``, ``has_gate``, ``_apply_gate``),
which hands each expert's input rows to the watchers.
"""

from __future__ import annotations

import fnmatch
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LLMPruneError
from .patterns import Pattern

Watcher = Callable[[str, torch.Tensor], None]  # (target name, its input rows)


def is_experts(mod: nn.Module) -> bool:
    """A fused experts module of transformers' ``use_experts_implementation`` kind."""
    down = getattr(mod, "down_proj", None)
    return hasattr(mod, "is_transposed") and hasattr(mod, "has_gate") and isinstance(down, nn.Parameter) \
        and down.dim() == 3


def _first_param(mod: nn.Module) -> str:
    return "gate_up_proj" if mod.has_gate else "up_proj"


@dataclass(eq=False)
class Target:
    """One prunable matrix: ``name`` is its record name (the Linear's module name, or
    ``<experts>.<param>[e]``), ``key`` its weight's name in patterns and masks."""

    name: str
    module: nn.Module
    param: str = "weight"
    expert: int | None = None

    @property
    def key(self) -> str:
        return weight_key(self.name)

    @property
    def state_key(self) -> str:
        """The state-dict entry holding it (the whole 3-D tensor for an expert)."""
        return self.key if self.expert is None else split_expert(self.name)[0]

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]``: the Linear's parameter, or a view into the expert's slice (writes go through)."""
        p = getattr(self.module, self.param)
        if self.expert is None:
            return p
        w = p.detach()[self.expert]
        return w.T if self.module.is_transposed else w


def weight_key(name: str) -> str:
    """Patterns/masks key of target ``name``: ``<linear>.weight``, or the expert name itself."""
    return name if name.endswith("]") else f"{name}.weight"


def expert_key(state_key: str, e: int) -> str:
    return f"{state_key}[{e}]"


def split_expert(name: str) -> tuple[str, int] | None:
    """``("<experts>.<param>", e)`` for an expert target name, else ``None``."""
    if not name.endswith("]"):
        return None
    state_key, _, e = name[:-1].rpartition("[")
    return state_key, int(e)


def fused_experts(root: nn.Module, prefix: str = "") -> dict[str, tuple[int, bool]]:
    """Every fused expert tensor under ``root`` that llmprune prunes: state key -> (experts, stored input-first)."""
    out = {}
    for name, mod in root.named_modules():
        if is_experts(mod):
            full = ".".join(p for p in (prefix, name) if p)
            for param in (_first_param(mod), "down_proj"):
                out[f"{full}.{param}"] = (getattr(mod, param).shape[0], bool(mod.is_transposed))
    return out


def find_targets(block: nn.Module, prefix: str, skip: list[str] | tuple[str, ...] = ()) -> dict[str, Target]:
    """Every target inside ``block`` by name, minus those matching a ``skip`` glob (globs match a Linear's
    module name, or a fused expert tensor's name: its experts are skipped together)."""
    found: dict[str, Target] = {}
    routers: set[int] = set()
    for name, mod in block.named_modules():
        if is_experts(mod):
            parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
            routers |= {id(m) for m in parent.children() if isinstance(m, nn.Linear) and m.out_features <= mod.num_experts}
    for name, mod in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if type(mod).__name__ == "Conv1D":
            raise LLMPruneError(
                f"{full} is a GPT-2-style Conv1D layer, which llmprune does not prune; "
                "use a model with nn.Linear layers (Llama, Mistral, Qwen2, Gemma, ...)"
            )
        if isinstance(mod, nn.Linear) and id(mod) not in routers and not _skipped(full, skip):
            found[full] = Target(full, mod)
        elif is_experts(mod):
            for param in (_first_param(mod), "down_proj"):
                if not _skipped(f"{full}.{param}", skip):
                    for e in range(getattr(mod, param).shape[0]):
                        found[expert_key(f"{full}.{param}", e)] = Target(expert_key(f"{full}.{param}", e), mod, param, e)
    return found


def _skipped(name: str, skip: list[str] | tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in skip)


def untargeted(block: nn.Module, prefix: str, skip: list[str] | tuple[str, ...] = (),
               share: float = 0.01) -> list[dict]:
    """Parameters of ``block`` holding at least ``share`` of its parameters that stay dense: name, shape,
    share, and why (``"skip"``: a ``--skip`` glob; ``"not a target"``: llmprune cannot prune it)."""
    kept = {t.state_key for t in find_targets(block, prefix, skip).values()}
    prunable = {t.state_key for t in find_targets(block, prefix).values()}
    total = sum(p.numel() for p in block.parameters())
    out = []
    for name, p in block.named_parameters():
        full = f"{prefix}.{name}"
        if full not in kept and p.numel() >= share * total:
            out.append({"name": full, "shape": list(p.shape), "share": round(p.numel() / total, 4),
                        "reason": "skip" if full in prunable else "not a target"})
    return out


def block_weight_counts(block: nn.Module) -> tuple[int, int]:
    """(zeros, numel) over every weight matrix of ``block`` (parameters of 2 or more dims), targets or not."""
    zeros = numel = 0
    for p in block.parameters():
        if p.dim() >= 2:
            zeros += int((p == 0).sum())
            numel += p.numel()
    return zeros, numel


# ---- watching target inputs -------------------------------------------------------------------------

def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if transposed:
        return x @ w if b is None else x @ w + b
    return F.linear(x, w, b)


def _routed_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop, generic over the declared layout, reporting each expert's inputs."""
    out = torch.zeros_like(hidden_states)
    first = _first_param(self)
    w1, w2 = getattr(self, first), self.down_proj
    b1 = getattr(self, f"{first}_bias") if self.has_bias else None
    b2 = self.down_proj_bias if self.has_bias else None
    names = self._llmprune_names
    for e in torch.unique(top_k_index).tolist():
        if e >= self.num_experts:  # expert-parallel sentinel
            continue
        pos, token = torch.where((top_k_index == e).T)  # eager's order: by top-k slot, then token
        x = hidden_states[token]
        for watcher in self._llmprune_watchers:
            watcher(names[first, e], x)
        h = _linear(x, w1[e], None if b1 is None else b1[e], self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        for watcher in self._llmprune_watchers:
            watcher(names["down_proj", e], h)
        y = _linear(h, w2[e], None if b2 is None else b2[e], self.is_transposed)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        out.index_add_(0, token, (y * top_k_weights[token, pos, None]).to(out.dtype))
    return out


def watch(targets: dict[str, Target], fn: Watcher) -> Callable[[], None]:
    """Call ``fn(name, x)`` with the input rows of every target each time it runs; returns the remover."""
    handles = []
    experts: dict[int, nn.Module] = {}

    def routed(n: str, x: torch.Tensor) -> None:  # an experts module reports all its experts
        if n in targets:
            fn(n, x)

    for name, t in targets.items():
        if t.expert is None:
            handles.append(t.module.register_forward_hook(lambda _m, inp, _o, n=name: fn(n, inp[0])))
        else:
            experts[id(t.module)] = t.module
    for mod in experts.values():
        if not hasattr(mod, "_llmprune_watchers"):
            prefix = next(t.state_key for t in targets.values() if t.module is mod).rsplit(".", 1)[0]
            mod._llmprune_watchers = []
            mod._llmprune_names = {(p, e): expert_key(f"{prefix}.{p}", e)
                                   for p in (_first_param(mod), "down_proj") for e in range(mod.num_experts)}
            mod.forward = types.MethodType(_routed_forward, mod)
        mod._llmprune_watchers.append(routed)

    def remove() -> None:
        for h in handles:
            h.remove()
        for mod in experts.values():
            mod._llmprune_watchers.remove(routed)
            if not mod._llmprune_watchers:
                del mod.forward, mod._llmprune_watchers, mod._llmprune_names

    return remove


# ---- a fused tensor's experts as one parameter (fine-tuning addresses parameters) ----------------------

@dataclass(frozen=True)
class ExpertsPattern:
    """``pattern`` on every expert of a fused tensor, as stored: ``[E, out, in]``, or ``[E, in, out]`` when
    ``transposed``. Quacks like a Pattern for the trainer (``project``, ``violations``)."""

    pattern: Pattern
    transposed: bool

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(-1, -2) if self.transposed else t

    def project(self, scores: torch.Tensor, sparsity: float | None = None) -> torch.Tensor:
        return self._own(self.pattern.project(self._own(scores), sparsity))

    def violations(self, weight: torch.Tensor) -> int:
        return sum(self.pattern.violations(w) for w in self._own(weight))

    def __str__(self) -> str:
        return str(self.pattern)


def by_parameter(patterns: dict[str, Pattern], masks: dict[str, torch.Tensor] | None,
                 fused: dict[str, tuple[int, bool]]) -> tuple[dict, dict | None]:
    """Patterns and masks keyed by parameter: a fused tensor's experts (``<t>[e]``) become one entry,
    an :class:`ExpertsPattern` and the stacked masks in the tensor's own layout."""
    out_p: dict = {}
    out_m: dict | None = None if masks is None else {}
    for key, pattern in patterns.items():
        split = split_expert(key)
        if split is None or split[0] not in fused:
            out_p[key] = pattern
            if masks is not None:
                out_m[key] = masks[key]
            continue
        name, e = split
        n, transposed = fused[name]
        if e == 0:
            if any(patterns.get(expert_key(name, i)) != pattern for i in range(n)):
                raise LLMPruneError(f"{name}: every expert must be a target, with one pattern")
            out_p[name] = ExpertsPattern(pattern, transposed)
            if masks is not None:
                out_m[name] = torch.stack([masks[expert_key(name, i)] for i in range(n)])
                out_m[name] = out_m[name].transpose(-1, -2) if transposed else out_m[name]
    return out_p, out_m


def by_expert(masks: dict[str, torch.Tensor], fused: dict[str, tuple[int, bool]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`by_parameter` for masks: a fused tensor's mask back to one ``[out, in]`` per expert."""
    out = {}
    for key, mask in masks.items():
        if key not in fused:
            out[key] = mask
            continue
        own = mask.transpose(-1, -2) if fused[key][1] else mask
        out.update({expert_key(key, e): own[e].contiguous() for e in range(own.shape[0])})
    return out
