"""Streaming, atomic checkpoint writing: tensors go in one by one, shards are flushed as they fill, and the
finished folder appears under its name only at the very end (a temp folder beside it is renamed)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..quant import Grid
from . import schema
from .card import model_card
from .hf import quantization_entry
from .codecs import PackedMask, check, encode, guard, prefix_of

_RESERVED = ("config.json", "generation_config.json", schema.INDEX_NAME)


def crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a contiguous CPU tensor's bytes (any dtype, bf16 included)."""
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy())


class CheckpointWriter:
    """Write a checkpoint tensor by tensor; use as a context manager and call :meth:`finish`.

    Leaving the ``with`` block without ``finish`` (an exception, an early return) removes the temp folder
    and leaves ``out_dir`` untouched. At most one shard (``max_shard_bytes``, or one larger tensor) is held
    in memory.
    """

    def __init__(self, out_dir: str | os.PathLike, fmt: str = "compressed", overwrite: bool = False,
                 max_shard_bytes: int = 2**30) -> None:
        if fmt not in schema.FORMATS:
            raise LLMPruneError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(schema.FORMATS)}")
        if max_shard_bytes <= 0:
            raise LLMPruneError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir).absolute()
        self.fmt, self.overwrite, self.max_shard_bytes = fmt, overwrite, max_shard_bytes
        self._refuse_existing()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Beside out_dir, so the final rename stays on one filesystem and is atomic.
        self._tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each flushed shard
        self._crc: dict[str, str] = {}
        self._total_bytes = 0
        self._targets: dict[str, Pattern] = {}
        self._experts: dict[str, dict[str, Any]] = {}
        self._zeros = self._numel = 0

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()

    def _refuse_existing(self) -> None:
        if self.out_dir.exists() and not self.overwrite:
            raise LLMPruneError(f"{self.out_dir} already exists; pass overwrite=True (--overwrite) to replace it")

    def _live(self) -> Path:
        if self._tmp is None:
            raise LLMPruneError(f"checkpoint writer for {self.out_dir} is already finished or aborted")
        return self._tmp

    def abort(self) -> None:
        """Discard everything written so far (no-op after :meth:`finish`)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self._buffer.clear()

    def add(self, name: str, tensor: torch.Tensor, pattern: Pattern | None = None,
            mask: torch.Tensor | PackedMask | None = None, grid: Grid | None = None) -> None:
        """Store ``tensor`` under ``name``; with ``pattern`` it is a pruned weight, verified and (in the
        compressed format) stored as its parts ``<prefix>.compressed`` etc. ``mask`` is the pruner's own
        mask (bool, or packed): the stored positions are exactly it, never guessed from zeros. ``grid``: the
        scales (and zeros) of a quantized pattern, its kept weights verified to lie on them."""
        self._live()
        if name in self._targets:
            raise LLMPruneError(f"{name} was added twice")
        tensor = tensor.detach()
        if pattern is None:
            self._put(name, tensor)
            return
        self._pruned(name, tensor, pattern, mask, grid)
        self._put(name, tensor if self.fmt != "compressed" else guard())
        self._zeros += int((tensor == 0).sum())
        self._numel += tensor.numel()

    def _pruned(self, name: str, weight: torch.Tensor, pattern: Pattern, mask: torch.Tensor | PackedMask | None,
                grid: Grid | None = None) -> None:
        """Verify one pruned ``[out, in]`` weight; the compressed format stores its parts."""
        if isinstance(mask, PackedMask):
            mask = mask.unpack()
        if self.fmt == "compressed":
            for suffix, part in encode(weight, pattern, name, mask, grid).items():
                self._put(f"{prefix_of(name)}.{suffix}", part)
        elif pattern.quant is not None and grid is not None:
            encode(weight, pattern, name, mask, grid)  # the dense format stores the grid values, still verified
        else:
            check(weight, pattern, name)  # the dense format still refuses a weight that breaks its pattern
        self._targets[name] = pattern

    def add_experts(self, name: str, tensor: torch.Tensor, pattern: Pattern, masks: list[torch.Tensor | PackedMask | None],
                    transposed: bool, grids: list[Grid | None] | None = None) -> None:
        """Store a fused 3-D experts tensor whose every expert is a target pruned to ``pattern``; ``masks[e]``
        is expert ``e``'s mask as ``[out, in]`` (``transposed``: the tensor stores ``[E, in, out]``). The
        compressed format stores each expert as its own compressed weight ``name[e]``; the dense format
        keeps the tensor whole, each expert verified."""
        self._live()
        tensor = tensor.detach()
        if tensor.dim() != 3 or len(masks) != tensor.shape[0]:
            raise LLMPruneError(f"{name}: expected a 3-D experts tensor with one mask per expert, got "
                                f"{tuple(tensor.shape)} and {len(masks)} masks")
        for e, mask in enumerate(masks):
            self._pruned(f"{name}[{e}]", tensor[e].T if transposed else tensor[e], pattern, mask,
                         None if grids is None else grids[e])
        self._put(name, tensor if self.fmt != "compressed" else guard())
        self._experts[name] = {"num_experts": tensor.shape[0], "transposed": transposed}
        self._zeros += int((tensor == 0).sum())
        self._numel += tensor.numel()

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._crc:
            raise LLMPruneError(f"{name} was added twice (or clashes with a compressed part of a pruned weight)")
        stored = tensor.to("cpu").contiguous()
        if stored.data_ptr() == tensor.data_ptr():
            stored = stored.clone()  # never hold the caller's memory: it may be reused before the flush
        nbytes = stored.numel() * stored.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = stored
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes
        self._crc[name] = f"{crc32(stored):08x}"

    def _flush(self) -> None:
        if not self._buffer:
            return
        save_file(self._buffer, self._live() / f"shard-{len(self._shards):05d}.part", metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def finish(self, config: Any, tokenizer: Any = None, sparsity_config: dict | None = None,
               extra_files: dict[str, bytes | str] | None = None, generation_config: Any = None) -> Path:
        """Write the index, ``config.json`` (with ``sparsity_config``), generation config, tokenizer and
        ``extra_files``, then move the folder to ``out_dir``. Returns ``out_dir``."""
        tmp = self._live()
        try:
            self._flush()
            if not self._shards:
                raise LLMPruneError(f"nothing to save to {self.out_dir}: no tensors were added")
            weight_map = {}
            for i, names in enumerate(self._shards):
                final = schema.shard_name(i + 1, len(self._shards))
                (tmp / f"shard-{i:05d}.part").rename(tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self._total_bytes, "format": "llmprune",
                                  "format_version": schema.FORMAT_VERSION, schema.CRC_KEY: self._crc},
                     "weight_map": weight_map}
            (tmp / schema.INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            config = copy.deepcopy(config)
            sparsity = self._zeros / self._numel if self._numel else 0.0
            setattr(config, schema.CONFIG_KEY, schema.build(self.fmt, self._targets, sparsity, sparsity_config,
                                                            self._experts))
            if self.fmt == "compressed" and self._targets:  # plain from_pretrained decodes it, or fails loudly
                config.quantization_config = quantization_entry()
            config.save_pretrained(tmp)
            if generation_config is not None:
                generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            files = dict(extra_files or {})
            if "README.md" not in files:  # the model card, from the run record when the caller saves one
                run = files.get("llmprune_run.json")
                files["README.md"] = model_card(self.fmt, self._targets, sparsity, json.loads(run) if run else None)
            for rel, content in files.items():
                self._write_extra(tmp, rel, content)
            self._publish(tmp)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        return self.out_dir

    @staticmethod
    def _write_extra(tmp: Path, rel: str, content: bytes | str) -> None:
        path = Path(rel)
        if path.is_absolute() or ".." in path.parts or rel in _RESERVED or path.suffix == ".safetensors":
            raise LLMPruneError(f"extra file name {rel!r} must be a relative path that is not a checkpoint file")
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            (tmp / path).write_text(content)
        else:
            (tmp / path).write_bytes(content)

    def _publish(self, tmp: Path) -> None:
        self._refuse_existing()  # it may have appeared since __init__
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700: a server running as another user must read it
        old = None
        if self.out_dir.exists() or self.out_dir.is_symlink():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            self.out_dir.rename(old)
        tmp.rename(self.out_dir)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
