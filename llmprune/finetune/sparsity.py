"""How sparsity is kept during training: the three modes, each a small object the loop calls around a step.

- :class:`Masked`: gradients of pruned positions are zeroed before every optimiser step (so Adam's moments
  stay zero there and the weights stay exactly zero); shared with block reconstruction.
- :class:`ADMM` (NxMTransformer): minimise f(W) + ρ/2‖W − Z + U‖² with Z = Π(W + U) projected onto the
  pattern every ``admm_every`` steps and U += W − Z, ρ growing; after ``admm_hard_prune`` of the run W is
  hard-pruned to Z and the rest is masked training on that mask.
- :class:`SRSTE` (pattern-ADMM paper): the forward uses W ⊙ Π(|W|) with the mask re-selected every step,
  the gradient flows straight through to the dense W, plus the sparse-refined decay λ·W ⊙ ¬mask.
"""

from __future__ import annotations

import torch
from torch import nn

from ..patterns import Pattern


def mask_grads(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero the gradients of pruned positions (the masked optimiser step, here and in block reconstruction)."""
    for w, m in zip(weights, masks):
        if w.grad is not None:
            w.grad.mul_(m)


class Masked:
    """Masks fixed: only kept weights train."""

    def __init__(self, weights: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        self.weights, self.masks = weights, {k: m.to(weights[k].device) for k, m in masks.items()}
        with torch.no_grad():
            for k, w in weights.items():
                w.masked_fill_(~self.masks[k], 0.0)  # +0.0, never the -0.0 of w * mask

    def before_forward(self) -> None:
        pass

    def penalty(self) -> torch.Tensor | float:
        return 0.0

    def before_step(self) -> None:
        mask_grads([self.weights[k] for k in self.masks], list(self.masks.values()))

    def after_step(self, step: int) -> None:
        with torch.no_grad():  # Adam moments from before the masks were fixed (admm) must not move pruned weights
            for k, m in self.masks.items():
                self.weights[k].masked_fill_(~m, 0.0)

    def final_masks(self) -> dict[str, torch.Tensor]:
        return self.masks

    def state(self) -> dict:
        return {"masks": self.masks}

    def load(self, state: dict) -> None:
        self.masks = state["masks"]


class ADMM(Masked):
    """NxMTransformer's ADMM, then masked on the projected support."""

    def __init__(self, weights: dict[str, nn.Parameter], patterns: dict[str, Pattern], rho: float, growth: float,
                 every: int, hard_prune_step: int) -> None:
        self.weights, self.patterns = weights, patterns
        self.rho, self.growth, self.every, self.hard_prune_step = rho, growth, every, hard_prune_step
        self.u = {k: torch.zeros_like(w) for k, w in weights.items()}
        self.z = {k: self._project(k, w.detach()) for k, w in weights.items()}
        self.masks: dict[str, torch.Tensor] = {}
        self.violation: list[float] = []  # ‖W − Z‖ / ‖W‖ at each projection

    def _project(self, k: str, v: torch.Tensor) -> torch.Tensor:
        return v.masked_fill(~self.patterns[k].project(v.abs().float()), 0.0)

    def penalty(self) -> torch.Tensor | float:
        if self.masks:
            return 0.0
        return sum(0.5 * self.rho * (w - self.z[k] + self.u[k]).float().square().sum() for k, w in self.weights.items())

    def before_step(self) -> None:
        if self.masks:
            super().before_step()

    def after_step(self, step: int) -> None:
        if self.masks:
            super().after_step(step)
            return
        with torch.no_grad():
            if step >= self.hard_prune_step:  # W := Z = P(W + U), then masked training on its support
                for k, w in self.weights.items():
                    self.masks[k] = self.patterns[k].project((w + self.u[k]).abs().float())
                    w.copy_((w + self.u[k]).masked_fill(~self.masks[k], 0.0))
                return
            if step % self.every:
                return
            num = den = 0.0
            for k, w in self.weights.items():
                self.z[k] = self._project(k, w + self.u[k])
                self.u[k] += w - self.z[k]
                num += float((w - self.z[k]).float().square().sum())
                den += float(w.float().square().sum())
            self.violation.append((num / max(den, 1e-30)) ** 0.5)
            self.rho *= self.growth
            for u in self.u.values():  # U is the dual scaled by 1/rho: keep the unscaled dual fixed
                u /= self.growth

    def final_masks(self) -> dict[str, torch.Tensor]:
        if not self.masks:  # a run shorter than its hard-prune point still ends exactly on the pattern
            self.after_step(self.hard_prune_step)
        return self.masks

    def state(self) -> dict:
        return {"masks": self.masks, "u": self.u, "z": self.z, "rho": self.rho, "violation": self.violation}

    def load(self, state: dict) -> None:
        self.masks, self.u, self.z = state["masks"], state["u"], state["z"]
        self.rho, self.violation = state["rho"], state["violation"]


class SRSTE(Masked):
    """Straight-through estimator with sparse-refined decay; the mask follows |W| every step."""

    def __init__(self, weights: dict[str, nn.Parameter], patterns: dict[str, Pattern], decay: float) -> None:
        self.weights, self.patterns, self.decay = weights, patterns, decay
        self.dense = {k: w.detach().clone() for k, w in weights.items()}
        self.masks = {k: self.patterns[k].project(w.abs().float()) for k, w in self.dense.items()}

    def before_forward(self) -> None:
        with torch.no_grad():  # the forward sees the sparse weights; the dense ones are kept aside
            for k, w in self.weights.items():
                self.masks[k] = self.patterns[k].project(self.dense[k].abs().float())
                w.copy_(self.dense[k].masked_fill(~self.masks[k], 0.0))

    def before_step(self) -> None:
        with torch.no_grad():  # straight through: the sparse weights' gradient updates the dense ones
            for k, w in self.weights.items():
                if w.grad is not None:
                    w.grad.add_(self.decay * self.dense[k] * ~self.masks[k])
                w.copy_(self.dense[k])

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for k, w in self.weights.items():
                self.dense[k].copy_(w)

    def final_masks(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for k, w in self.weights.items():
                self.masks[k] = self.patterns[k].project(self.dense[k].abs().float())
                w.copy_(self.dense[k].masked_fill(~self.masks[k], 0.0))
        return self.masks

    def state(self) -> dict:
        return {"masks": self.masks, "dense": self.dense}

    def load(self, state: dict) -> None:
        self.masks, self.dense = state["masks"], state["dense"]
