"""The work directory that lets a killed run continue from its last finished block.

After block ``i`` the engine commits, in this order: ``block-i.safetensors`` (the pruned block and,
under ``mask:``-prefixed names, the masks its method chose, packed 8 to a byte, and under ``scale:``/``zero:``
the grids of quantized targets), ``acts-(i+1).pt`` (the next block's inputs), then ``state.json`` saying ``done = i + 1``. Every file is
written to a temp name, fsynced and renamed, and ``state.json`` is the commit point, so a kill at any
moment leaves a state whose files all exist; anything newer is stray and gets overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import LLMPruneError
from ..export.codecs import pack_bits, unpack_bits
from ..models import to_device
from ..quant import Grid
from ..report import write_atomic

STATE = "state.json"
VERSION = 2  # 2: the plan's fingerprint, per-block kwargs and masks
MASK = "mask:"
SCALE, ZERO = "scale:", "zero:"  # a quantized target's grid


def _block(i: int) -> str:
    return f"block-{i:05d}.safetensors"


def _acts(i: int) -> str:
    return f"acts-{i:05d}.pt"


class WorkDir:
    """Persisted progress of one pruning run, identified by ``fingerprint`` (config, model, data)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path).expanduser()
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back from disk

    def start(self, resume: bool) -> dict[str, Any] | None:
        """The saved state to continue from, or None to start afresh; refuses a mismatched or unasked resume."""
        state_path = self.path / STATE
        if not state_path.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            return None
        if not resume:
            raise LLMPruneError(f"work dir {self.path} holds an unfinished run; pass --resume to continue it "
                                "or choose another --work-dir")
        try:
            state = json.loads(state_path.read_text())
        except ValueError as e:
            raise LLMPruneError(f"{state_path}: unreadable ({e})") from e
        if state.get("version") != VERSION:
            raise LLMPruneError(f"{state_path}: written by another llmprune version; remove the work dir")
        saved = state["fingerprint"]
        if saved != self.fingerprint:
            diff = _diff(saved, self.fingerprint)
            raise LLMPruneError(f"cannot resume from {self.path}: this run differs from the saved one in "
                                f"{'; '.join(diff[:4])}; use the same settings or another --work-dir")
        return state

    def commit(self, done: int, acts: Any, record: dict[str, Any], block: dict[str, torch.Tensor] | None = None,
               masks: dict[str, torch.Tensor] | None = None, grids: dict[str, Grid] | None = None) -> None:
        """Persist block ``done - 1`` (if given) with its ``masks`` and ``grids`` and the inputs of block
        ``done``, then move the commit point."""
        if block is not None:
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in block.items()}
            cpu.update({f"{MASK}{k}": pack_bits(m.to("cpu")) for k, m in (masks or {}).items()})
            for k, g in (grids or {}).items():
                cpu.update({f"{SCALE}{k}": g.scale.contiguous(), f"{ZERO}{k}": g.zero.contiguous()})
            write_atomic(self.path / _block(done - 1), lambda tmp: save_file(cpu, tmp))
        write_atomic(self.path / _acts(done), lambda tmp: torch.save(to_device(acts, "cpu"), tmp))
        state = {"version": VERSION, "fingerprint": self.fingerprint, "done": done, "record": record}
        write_atomic(self.path / STATE, lambda tmp: Path(tmp).write_text(json.dumps(state, indent=1)))
        (self.path / _acts(done - 1)).unlink(missing_ok=True)  # superseded now that the state points past it

    def acts(self, done: int) -> Any:
        return torch.load(self.path / _acts(done), weights_only=True)

    def block(self, i: int, shapes: dict[str, tuple[int, ...]]
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Grid]]:
        """Saved block ``i``: its state dict, its masks (full weight names -> bool, shaped by ``shapes``) and
        its targets' grids."""
        saved = load_file(self.path / _block(i))
        tensors = {k: v for k, v in saved.items() if not k.startswith((MASK, SCALE, ZERO))}
        masks = {k[len(MASK):]: unpack_bits(v, shapes[k[len(MASK):]]) for k, v in saved.items() if k.startswith(MASK)}
        grids = {k[len(SCALE):]: Grid(v, saved[f"{ZERO}{k[len(SCALE):]}"]) for k, v in saved.items() if k.startswith(SCALE)}
        return tensors, masks, grids

    def remove(self) -> None:
        """Delete what this run wrote (state first, so a half-removed dir never looks resumable)."""
        (self.path / STATE).unlink(missing_ok=True)
        for p in self.path.iterdir():
            if p.name.startswith(("block-", "acts-", f".{STATE}.", ".block-", ".acts-")):
                p.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass  # the user keeps other files here


def _diff(saved: dict, now: dict, where: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{where}{key}.")
        elif a != b:
            out.append(f"{where}{key}: saved {a!r}, now {b!r}")
    return out
