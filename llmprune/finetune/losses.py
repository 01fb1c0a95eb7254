"""The training objectives: cross-entropy, KD on logits, SquareHead on hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of ``ids`` ``[B, T]`` under ``logits`` ``[B, T, V]``."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened next-token distributions, scaled by T² (Hinton et al.)."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, -1).flatten(0, 1)
    log_t = F.log_softmax(teacher.float() / t, -1).flatten(0, 1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * t * t


def squarehead(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023): mean over layers of ‖h_s − h_t‖² / ‖h_t‖², so every layer weighs
    the same whatever the scale of its hidden states."""
    terms = [(s.float() - t.float()).square().mean() / t.float().square().mean().clamp_min(1e-12)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()
