"""Prune a checkpoint on disk without ever holding the whole model: blocks are read lazily from the
safetensors shards, pruned one at a time and streamed out through :class:`CheckpointWriter`.

The model is built as a skeleton (parameters on the meta device, buffers such as rotary frequencies
computed for real by their modules' own init), so the captured inputs equal those of a model loaded
whole. Host memory holds about one block, the writer's shard buffer and (with ``offload_activations``)
the activations; the device holds one block, its XᵀX matrices and the activations.

    record = prune_checkpoint("llama-2-7b/", "llama-2-7b-24/", PruneConfig(pattern="2:4"))
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from .config import PruneConfig
from .data import calibration_windows
from .engine import Activations, capture_first_block, check_shapes, model_identity, run_blocks
from .errors import LLMPruneError
from .export import CheckpointWriter
from .models import DTYPES, find_blocks, find_linears
from .patterns import Pattern
from .shards import SafetensorsDir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


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


def check_complete(model: nn.Module, src: SafetensorsDir) -> None:
    """Refuse, before any work, a checkpoint that lacks a tensor of the model or stores it in another shape."""
    expected = model.state_dict()
    for name in stored_names(model):
        if name not in src:
            raise LLMPruneError(f"{name}: missing from the checkpoint at {src.path}")
        if src.shapes[name] != tuple(expected[name].shape):
            raise LLMPruneError(f"{name}: stored with shape {src.shapes[name]}, but config.json implies "
                                f"{tuple(expected[name].shape)}")


class StreamBlocks:
    """Blocks read from ``src`` on demand and written to ``writer`` once pruned (engine ``Blocks``)."""

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList, src: SafetensorsDir,
                 writer: CheckpointWriter, skip: list[str]) -> None:
        self.model, self.prefix, self.blocks, self.src, self.writer = model, prefix, blocks, src, writer
        self.skip = skip
        self.dtypes = {k: t.dtype for k, t in model.state_dict().items()}
        self.stored = stored_names(model)  # before capture, which unties the skeleton's tied parameters
        inside = {id(m) for b in blocks for m in b.modules()}
        self.outside = [m for m in model.modules() if id(m) not in inside]

    def _read(self, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        return {k: t.to(self.dtypes[k]) for k, t in self.src.load(names, device).items()}

    def _targets(self, i: int) -> set[str]:
        return {f"{n}.weight" for n in find_linears(self.blocks[i], f"{self.prefix}.{i}", self.skip)}

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
            return capture_first_block(self.model, self.blocks[0], ids, batch_size, device, store)
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

    def restore(self, i: int, tensors: dict[str, torch.Tensor], pattern: Pattern) -> None:
        targets = self._targets(i)
        for k, t in tensors.items():
            name = f"{self.prefix}.{i}.{k}"
            self.writer.add(name, t, pattern if name in targets else None)

    def store(self, i: int, pattern: Pattern) -> None:
        self.restore(i, self.blocks[i].state_dict(), pattern)

    def release(self, i: int) -> None:
        self.blocks[i].to("meta")

    def copy_outside(self) -> None:
        """Every tensor outside the blocks, read and written one at a time (tied ones once)."""
        for name in self.stored:
            if not name.startswith(f"{self.prefix}."):
                self.writer.add(name, self._read([name], torch.device("cpu"))[name])


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise LLMPruneError(f"{path}: cannot load the tokenizer: {e}") from e


def prune_checkpoint(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PruneConfig,
    tokenizer: Any = None,
    fmt: str = "compressed",
    overwrite: bool = False,
    calib: torch.Tensor | None = None,
    dtype: str = "auto",
    quiet: bool = False,
    run_record: dict[str, Any] | None = None,
    max_shard_bytes: int = 2**30,
) -> dict[str, Any]:
    """Prune the safetensors checkpoint in ``src_dir`` block by block into ``out_dir`` (written atomically).

    ``calib`` (``[n, seqlen]`` token ids) overrides the calibration data named in ``config``; the tokenizer
    defaults to the one in ``src_dir``. ``run_record`` (e.g. the CLI's command and environment) is saved
    with the pruning record as ``llmprune_run.json``. Returns the pruning record, as ``prune`` does.
    Everything that can be checked (shards, shapes, pattern, output folder) is checked before pruning.
    """
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    config.validate()
    src_path = Path(src_dir).expanduser()
    src = SafetensorsDir(src_path)
    model = skeleton(src_path, src, dtype)
    check_complete(model, src)
    prefix, blocks = find_blocks(model)
    check_shapes(blocks, prefix, config)  # refuse impossible patterns before reading any data
    tokenizer = tokenizer if tokenizer is not None else _tokenizer(src_path)
    with CheckpointWriter(out_dir, fmt, overwrite, max_shard_bytes) as writer:  # refuses an existing out_dir
        if calib is None:
            if tokenizer is None:
                raise LLMPruneError(f"{src_path} has no tokenizer: pass one, or calibration token ids")
            calib = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed,
                                        config.data_dir)
        t_prepare = time.perf_counter() - t0
        io = StreamBlocks(model, prefix, blocks, src, writer, config.skip)
        record, work = run_blocks(prefix, blocks, io, calib, config, model_identity(model, blocks), quiet)
        t1 = time.perf_counter()
        io.copy_outside()
        out_config = copy.deepcopy(model.config)
        out_config.architectures = [type(model).__name__]
        targets = {layer["name"] + ".weight" for layer in record["layers"]}
        ignore = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.weight" not in targets]
        generation = GenerationConfig.from_pretrained(src_path) if (src_path / "generation_config.json").is_file() else None
        record["seconds"]["prepare"] = t_prepare
        run = json.dumps({**(run_record or {}), "prune": record}, indent=2, default=str)
        writer.finish(out_config, tokenizer, {"ignore": ignore}, {"llmprune_run.json": run}, generation)
    if work is not None:
        work.remove()  # only now: the output is published
    record["seconds"].update(write=time.perf_counter() - t1, total=time.perf_counter() - t0)
    return record
