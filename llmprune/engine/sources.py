"""Where decoder blocks come from and where the pruned ones go (the engine's :class:`Blocks`).

:class:`InPlaceBlocks`: a model in memory, pruned in place. :class:`StreamBlocks`: a safetensors checkpoint
read lazily, block by block, and written out through a :class:`CheckpointWriter` as each block is done.
The streamed model is a skeleton (parameters on the meta device, buffers such as rotary frequencies
computed for real by their modules' own init), so the captured inputs equal those of a model loaded
whole. Host memory holds about one block, the writer's shard buffer and (with ``offload_activations``)
the activations.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from accelerate import init_empty_weights
from torch import nn

from ..errors import LLMPruneError
from ..export import CheckpointWriter
from ..models import DTYPES
from ..targets import find_targets, fused_experts
from .convert import ConvertedSource
from ..patterns import Pattern
from ..quant import Grid
from ..shards import SafetensorsDir
from .capture import Activations, capture_blocks, capture_inputs


class Blocks(Protocol):
    """Where the decoder blocks come from and where the pruned ones go."""

    def capture(self, ids: torch.Tensor, batch_size: int, device: torch.device, store: torch.device) -> Activations:
        """The inputs of block 0, and every block's kwargs, for the calibration windows ``ids``."""

    def load(self, i: int, device: torch.device) -> None:
        """Put dense block ``i`` on ``device``."""

    def unload(self, i: int) -> None:
        """Put dense block ``i`` (on the device, unchanged) away again."""

    def store(self, i: int, pattern: Pattern, masks: dict[str, torch.Tensor], grids: dict[str, Grid]) -> None:
        """Block ``i`` is pruned to ``pattern`` with ``masks`` (and quantized on ``grids``; still on the device):
        keep it wherever the result goes."""

    def release(self, i: int) -> None:
        """Free the device (and host) memory of stored block ``i``."""

    def restore(self, i: int, tensors: dict[str, torch.Tensor], pattern: Pattern, masks: dict[str, torch.Tensor],
                grids: dict[str, Grid]) -> None:
        """Block ``i`` was pruned by an earlier, interrupted run: keep its saved state dict."""


class InPlaceBlocks:
    """Blocks of a model in memory, pruned in place; each visits the device and goes back home."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self.model, self.blocks = model, blocks
        self.home = next(blocks[0].parameters()).device

    def capture(self, ids: torch.Tensor, batch_size: int, device: torch.device, store: torch.device) -> Activations:
        return capture_inputs(self.model, self.blocks, ids, batch_size, device, store)

    def load(self, i: int, device: torch.device) -> None:
        self.blocks[i].to(device)

    def unload(self, i: int) -> None:
        self.blocks[i].to(self.home)

    def store(self, i: int, pattern: Pattern, masks: dict[str, torch.Tensor], grids: dict[str, Grid]) -> None:
        self.blocks[i].to(self.home)

    def release(self, i: int) -> None:
        pass

    def restore(self, i: int, tensors: dict[str, torch.Tensor], pattern: Pattern, masks: dict[str, torch.Tensor],
                grids: dict[str, Grid]) -> None:
        self.blocks[i].load_state_dict(tensors)


def skeleton(path: str | os.PathLike, src: SafetensorsDir, dtype: str = "auto") -> nn.Module:
    """The causal LM described by ``path/config.json`` with every parameter on the meta device, in the
    dtype ``load_model(path, dtype)`` would give it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype != "auto" and dtype not in DTYPES:
        raise LLMPruneError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise LLMPruneError(f"{path}: cannot read config.json: {e}") from e
    if dtype != "auto":
        resolved = DTYPES[dtype]
    elif isinstance(config.dtype, torch.dtype):
        resolved = config.dtype
    else:  # transformers' "auto": the first floating tensor of the checkpoint
        resolved = next((d for d in src.dtypes.values() if d.is_floating_point), torch.float32)
    try:
        with init_empty_weights(include_buffers=False):  # buffers are not in checkpoints: compute them
            model = AutoModelForCausalLM.from_config(config, dtype=resolved)
    except (ValueError, TypeError, KeyError) as e:
        raise LLMPruneError(f"{path}: cannot build a model from config.json: {e}") from e
    model.tie_weights()  # skipped with empty weights; tied parameters are stored once
    model.config.use_cache = False
    return model.eval()


def stored_names(model: nn.Module) -> list[str]:
    """State-dict names that hold data, a tied parameter counted once under its first name."""
    seen: set[int] = set()
    names = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def check_complete(model: nn.Module, src: SafetensorsDir) -> ConvertedSource:
    """Refuse, before any work, a checkpoint that lacks a tensor of the model or stores it in another shape;
    returns the checkpoint seen through transformers' conversion mapping (hub-layout experts fused)."""
    expected = model.state_dict()
    source = ConvertedSource(model, src)
    for name in stored_names(model):
        if name not in source:
            raise LLMPruneError(f"{name}: missing from the checkpoint at {src.path}")
        shape = source.shape(name)
        if shape is not None and shape != tuple(expected[name].shape):
            raise LLMPruneError(f"{name}: stored with shape {shape}, but config.json implies "
                                f"{tuple(expected[name].shape)}")
    return source


class StreamBlocks:
    """Blocks read from ``src`` on demand and written to ``writer`` once pruned (engine ``Blocks``)."""

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, src: ConvertedSource,
                 writer: CheckpointWriter | None, skip: list[str] | tuple[str, ...]) -> None:
        self.model, self.prefix, self.blocks, self.src, self.writer = model, prefix, blocks, src, writer
        self.skip = skip
        self.dtypes = {k: t.dtype for k, t in model.state_dict().items()}
        self.stored = stored_names(model)  # before capture, which unties the skeleton's tied parameters
        inside = {id(m) for b in blocks for m in b.modules()}
        self.outside = [m for m in model.modules() if id(m) not in inside]

    def _read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: t.to(self.dtypes[k]) for k, t in self.src.load(names, device).items()}

    def _targets(self, i: int) -> set[str]:
        return {t.key for t in find_targets(self.blocks[i], f"{self.prefix}.{i}", self.skip).values()}

    def capture(self, ids: torch.Tensor, batch_size: int, device: torch.device, store: torch.device) -> Activations:
        # Everything outside the blocks but the output head (the largest of them, never run before block 0)
        # is read onto the device for the capture, and dropped again after it.
        head = self.model.get_output_embeddings()
        skip = [f"{self.prefix}."] + [f"{n}." for n, m in self.model.named_modules() if m is head]
        wanted = [n for n in self.stored if not n.startswith(tuple(skip))]
        self.model.load_state_dict(self._read(wanted, device), strict=False, assign=True)
        for m in self.outside:
            m._apply(lambda t: t if t.is_meta else t.to(device), recurse=False)
        try:
            return capture_blocks(self.model, self.blocks, ids, batch_size, device, store)
        finally:
            for m in self.outside:
                m._apply(lambda t: t.to("meta"), recurse=False)

    def load(self, i: int, device: torch.device) -> None:
        block = f"{self.prefix}.{i}."
        names = [n for n in self.dtypes if n.startswith(block)]
        tensors = self._read(names, device)
        self.blocks[i].load_state_dict({k[len(block):]: v for k, v in tensors.items()}, strict=True, assign=True)
        self.blocks[i].to(device)  # its computed buffers, if any

    def unload(self, i: int) -> None:
        self.release(i)

    def restore(self, i: int, tensors: dict[str, torch.Tensor], pattern: Pattern, masks: dict[str, torch.Tensor],
                grids: dict[str, Grid]) -> None:
        targets = self._targets(i)
        fused = fused_experts(self.blocks[i], f"{self.prefix}.{i}")
        for k, t in tensors.items():
            name = f"{self.prefix}.{i}.{k}"
            if name in fused and f"{name}[0]" in targets:
                n, transposed = fused[name]
                self.writer.add_experts(name, t, pattern, [masks.get(f"{name}[{e}]") for e in range(n)], transposed,
                                        [grids.get(f"{name}[{e}]") for e in range(n)])
            else:
                self.writer.add(name, t, pattern if name in targets else None, masks.get(name), grids.get(name))

    def store(self, i: int, pattern: Pattern, masks: dict[str, torch.Tensor], grids: dict[str, Grid]) -> None:
        self.restore(i, self.blocks[i].state_dict(), pattern, masks, grids)

    def release(self, i: int) -> None:
        self.blocks[i].to("meta")

    def copy_outside(self) -> None:
        """Every tensor outside the blocks, read and written one at a time (tied ones once)."""
        for name in self.stored:
            if not name.startswith(f"{self.prefix}."):
                self.writer.add(name, self._read([name], torch.device("cpu"))[name])
