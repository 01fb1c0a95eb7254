"""Capture what the decoder blocks receive: block 0's hidden states and *every* block's keyword arguments.

Hybrid-attention models (Gemma 2/3, gpt-oss, Cohere2, ...) give block types different attention masks
and rotary embeddings, so block 0's kwargs are wrong for the others (a full-attention Gemma-3 block run
with the sliding-window block's kwargs is off by up to 25 % at 2048 tokens). During capture every
block's ``forward`` is swapped for a catcher that records its kwargs and passes the hidden states on
unchanged; the kwargs depend only on the token positions, never on the hidden states, so the blocks
themselves never run (and may still be on the meta device). The last catcher stops the pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models import move_non_block_modules, to_device


class StopForward(Exception):
    """Raised by a hook once everything wanted from a forward pass has been seen."""


@dataclass
class Activations:
    """Calibration hidden states between blocks, batched, and each block's kwargs per batch size.

    ``targets``: the dense model's hidden states for the same batches (``dense_targets``).
    ``block``: the block whose kwargs :meth:`kwargs_for` gives (set by the run loop).
    """

    batches: list[torch.Tensor]
    kwargs: list[dict[int, dict[str, Any]]] = field(default_factory=list)
    targets: list[torch.Tensor] | None = None
    block: int = 0

    def kwargs_for(self, x: torch.Tensor) -> dict[str, Any]:
        return self.kwargs[self.block][x.shape[0]]

    def state(self) -> dict[str, Any]:
        """What the work dir persists (kwargs shared between blocks are stored once by ``torch.save``)."""
        return {"batches": self.batches, "kwargs": self.kwargs, "targets": self.targets}

    @classmethod
    def from_state(cls, raw: dict[str, Any], store: torch.device, device: torch.device) -> Activations:
        memo: dict[int, Any] = {}
        return cls([x.to(store) for x in raw["batches"]], to_device(raw["kwargs"], device, memo),
                   None if raw.get("targets") is None else [x.to(store) for x in raw["targets"]])


def block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_blocks(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                   device: torch.device, store: torch.device) -> Activations:
    """Block 0's inputs and every block's kwargs, with whatever runs before the blocks already on ``device``."""
    acts = Activations([], [{} for _ in blocks])
    last = len(blocks) - 1

    def catcher(i: int):  # noqa: ANN202
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                acts.batches.append(hidden.to(store))
            acts.kwargs[i].setdefault(hidden.shape[0], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i == last:
                raise StopForward
            return hidden  # the next catcher only needs its kwargs, not this block's real output

        return forward

    own = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's hooks set one: keep it
    for i, block in enumerate(blocks):
        block.forward = catcher(i)  # an instance attribute shadows the class's forward
    try:
        for batch in ids.split(batch_size):
            try:
                model(batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    return acts


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                   device: torch.device, store: torch.device) -> Activations:
    """:func:`capture_blocks` for a model in memory: its non-block modules visit ``device`` for the capture."""
    home = next(blocks[0].parameters()).device
    move_non_block_modules(model, blocks, device)
    try:
        return capture_blocks(model, blocks, ids, batch_size, device, store)
    finally:
        move_non_block_modules(model, blocks, home)
