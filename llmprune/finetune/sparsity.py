"""How sparsity is kept during training: the three modes, each a small object the loop calls around a step.

- :class:`Masked`: gradients of pruned positions are zeroed before every optimiser step (so Adam's moments
  stay zero there and the weights stay exactly zero); shared with block reconstruction.
- :class:`ADMM` (NxMTransformer): minimise f(W) + ρ/2‖W − Z + U‖² with Z = Π(W + U) projected onto the
  pattern every ``admm_every`` steps and U += W − Z, ρ growing; after ``admm_hard_prune`` of the run W is
  hard-pruned to Z and the rest is masked training on that mask.
- :class:`SRSTE` (pattern-ADMM paper): the forward uses W ⊙ Π(|W|) with the mask re-selected every step,
  the gradient flows straight through to the dense W, plus the sparse-refined decay λ·W ⊙ ¬mask.

Each works on this process's shard of a weight (``shard.local``; the whole weight without FSDP) and
chooses masks on the whole weight (``shard.whole``), so under FSDP it picks the masks one process does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..patterns import Pattern
from .shard import local, piece_of, summed, whole


def mask_grads(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero the gradients of pruned positions (the masked optimiser step, here and in block reconstruction)."""
    for w, m in zip(weights, masks):
        if w.grad is not None:
            local(w.grad).mul_(m)


class Masked:
    """Masks fixed: only kept weights train."""

    def __init__(self, weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        self.weights, self.masks = weights, {k: piece_of(m, weights[k]) for k, m in masks.items()}
        with torch.no_grad():
            for k, w in weights.items():
                local(w).masked_fill_(~self.masks[k], 0.0)  # +0.0, never the -0.0 of w * mask

    def _select(self, k: str, piece: torch.Tensor) -> torch.Tensor:
        """The pattern's mask of the whole tensor whose shard is ``piece`` (for weight ``k``), as a shard."""
        return piece_of(self.patterns[k].project(whole(piece, self.weights[k]).abs().float()), self.weights[k])

    def before_forward(self) -> None:
        pass

    def before_step(self) -> None:
        mask_grads([self.weights[k] for k in self.masks], list(self.masks.values()))

    def after_step(self, step: int) -> None:
        with torch.no_grad():  # Adam moments from before the masks were fixed (admm) must not move pruned weights
            for k, m in self.masks.items():
                local(self.weights[k]).masked_fill_(~m, 0.0)

    def final_masks(self) -> dict[str, torch.Tensor]:
        """The whole masks (on every process)."""
        return self._whole(self.masks)

    def _whole(self, shards: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: whole(t, self.weights[k]) for k, t in shards.items()}

    def _pieces(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: piece_of(t, self.weights[k]) for k, t in tensors.items()}

    def state(self) -> dict:
        """Whole tensors, so a run resumes under any number of processes; every process must call it."""
        return {"masks": self._whole(self.masks)}

    def load(self, state: dict) -> None:
        self.masks = self._pieces(state["masks"])


class ADMM(Masked):
    """NxMTransformer's ADMM, then masked on the projected support."""

    def __init__(self, weights: dict[str, nn.Parameter], patterns: dict[str, Pattern], rho: float, growth: float,
                 every: int, hard_prune_step: int) -> None:
        self.weights, self.patterns = weights, patterns
        self.rho, self.growth, self.every, self.hard_prune_step = rho, growth, every, hard_prune_step
        self.u = {k: torch.zeros_like(local(w)) for k, w in weights.items()}
        self.z = {k: self._project(k, local(w).detach()) for k, w in weights.items()}
        self.masks: dict[str, torch.Tensor] = {}
        self.violation: list[float] = []  # ‖W − Z‖ / ‖W‖ at each projection

    def _project(self, k: str, v: torch.Tensor) -> torch.Tensor:
        return v.masked_fill(~self._select(k, v), 0.0)

    def before_step(self) -> None:
        if self.masks:
            super().before_step()
            return
        with torch.no_grad():  # the penalty's gradient, added once to the (already averaged) task gradient
            for k, w in self.weights.items():
                if w.grad is not None:
                    local(w.grad).add_(self.rho * (local(w) - self.z[k] + self.u[k]))

    def after_step(self, step: int) -> None:
        if self.masks:
            super().after_step(step)
            return
        with torch.no_grad():
            if step >= self.hard_prune_step:  # W := Z = P(W + U), then masked training on its support
                for k, w in self.weights.items():
                    v = local(w) + self.u[k]
                    self.masks[k] = self._select(k, v)
                    local(w).copy_(v.masked_fill(~self.masks[k], 0.0))
                return
            if step % self.every:
                return
            sums = torch.zeros(2, dtype=torch.float64)
            for k, w in self.weights.items():
                self.z[k] = self._project(k, local(w) + self.u[k])
                self.u[k] += local(w) - self.z[k]
                sums += torch.stack([(local(w) - self.z[k]).double().square().sum(),
                                     local(w).double().square().sum()]).cpu()
            num, den = summed(sums, next(iter(self.weights.values()))).tolist()
            self.violation.append((num / max(den, 1e-30)) ** 0.5)
            self.rho *= self.growth
            for u in self.u.values():  # U is the dual scaled by 1/rho: keep the unscaled dual fixed
                u /= self.growth

    def final_masks(self) -> dict[str, torch.Tensor]:
        if not self.masks:  # a run shorter than its hard-prune point still ends exactly on the pattern
            self.after_step(self.hard_prune_step)
        return super().final_masks()

    def state(self) -> dict:
        return {"masks": self._whole(self.masks), "u": self._whole(self.u), "z": self._whole(self.z),
                "rho": self.rho, "violation": self.violation}

    def load(self, state: dict) -> None:
        self.masks, self.u, self.z = (self._pieces(state[k]) for k in ("masks", "u", "z"))
        self.rho, self.violation = state["rho"], state["violation"]


class SRSTE(Masked):
    """Straight-through estimator with sparse-refined decay; the mask follows |W| every step."""

    def __init__(self, weights: dict[str, nn.Parameter], patterns: dict[str, Pattern], decay: float) -> None:
        self.weights, self.patterns, self.decay = weights, patterns, decay
        self.dense = {k: local(w).detach().clone() for k, w in weights.items()}
        self.masks = {k: self._select(k, d) for k, d in self.dense.items()}

    def before_forward(self) -> None:
        with torch.no_grad():  # the forward sees the sparse weights; the dense ones are kept aside
            for k, w in self.weights.items():
                self.masks[k] = self._select(k, self.dense[k])
                local(w).copy_(self.dense[k].masked_fill(~self.masks[k], 0.0))

    def before_step(self) -> None:
        with torch.no_grad():  # straight through: the sparse weights' gradient updates the dense ones
            for k, w in self.weights.items():
                if w.grad is not None:
                    local(w.grad).add_(self.decay * self.dense[k] * ~self.masks[k])
                local(w).copy_(self.dense[k])

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for k, w in self.weights.items():
                self.dense[k].copy_(local(w))

    def final_masks(self) -> dict[str, torch.Tensor]:
        self.before_forward()  # the last mask of the trained dense weights, and the weights onto it
        return super().final_masks()

    def state(self) -> dict:
        return {"masks": self._whole(self.masks), "dense": self._whole(self.dense)}

    def load(self, state: dict) -> None:
        self.masks, self.dense = self._pieces(state["masks"]), self._pieces(state["dense"])
