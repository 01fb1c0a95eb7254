"""Open a saved checkpoint and hand out verified tensors: every failure names the tensor or file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig

from ..errors import LLMPruneError
from ..patterns import Pattern
from ..shards import SafetensorsDir
from ..targets import split_expert
from . import schema
from .codecs import check, decode, mask_of, parts_of, prefix_of
from .writer import crc32


class Checkpoint:
    """A checkpoint folder written by :class:`CheckpointWriter`, with its structure checked on open.

    ``targets`` maps each pruned parameter to its declared pattern; :meth:`weight` returns any parameter
    as a dense tensor after checksum, structure and pattern checks.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise LLMPruneError(f"{self.path}: no config.json (not a checkpoint folder)")
        try:
            self.config = AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError, KeyError) as exc:
            raise LLMPruneError(f"{self.path / 'config.json'}: cannot be read: {exc}") from exc
        sc = getattr(self.config, schema.CONFIG_KEY, None)
        self.fmt, self.targets = schema.declared(sc)
        self.experts = schema.declared_experts(sc, self.targets)  # fused tensor -> (experts, transposed)
        index_path = self.path / schema.INDEX_NAME
        try:
            index = json.loads(index_path.read_text())
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            self._crc: dict[str, str] = dict(index["metadata"][schema.CRC_KEY])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LLMPruneError(f"{index_path}: missing or malformed index ({exc})") from exc
        self.files = SafetensorsDir(self.path, strict=True)  # shards, headers and sizes checked here
        self.stored_bytes = self.files.nbytes
        self._whole: dict[str, torch.Tensor] = {}  # the last dense-format experts tensor read
        self._check_targets()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint's model was saved in (``config.json``'s ``dtype``; fp32 if unset)."""
        dt = getattr(self.config, "dtype", None)
        return getattr(torch, dt.removeprefix("torch.")) if isinstance(dt, str) else dt or torch.float32

    def _stored_names(self, name: str) -> list[str]:
        """Stored tensor names holding parameter (or expert target) ``name``."""
        if name in self.targets and self.fmt == "compressed":
            return [f"{prefix_of(name)}.{s}" for s in parts_of(self.targets[name])]
        if (split := split_expert(name)) is not None and split[0] in self.experts:
            return [split[0]]  # the dense format keeps the 3-D tensor whole
        if name in self.experts and self.fmt == "compressed":
            return [s for e in range(self.experts[name][0]) for s in self._stored_names(f"{name}[{e}]")]
        return [name]

    def _check_targets(self) -> None:
        for name in self.targets:
            if missing := [s for s in self._stored_names(name) if s not in self.weight_map]:
                raise LLMPruneError(f"{missing[0]}: part of pruned weight {name} is not in the checkpoint")

    def params(self) -> Iterator[str]:
        """Parameter (state-dict) names in the checkpoint, in stored order."""
        parts = {s for name in self.targets for s in self._stored_names(name)}
        if self.fmt == "compressed":  # each pruned parameter's own name holds only an empty guard tensor
            parts |= set(self.targets) | set(self.experts)
        yield from (n for n in self.weight_map if n not in parts)
        yield from (n for n in self.targets if split_expert(n) is None or split_expert(n)[0] not in self.experts)
        yield from self.experts

    def tensor(self, stored: str) -> torch.Tensor:
        """One stored tensor, its checksum verified."""
        file = self.weight_map.get(stored)
        if file is None:
            raise LLMPruneError(f"{stored}: not in the checkpoint")
        tensor = self.files.load([stored])[stored]
        expected = self._crc.get(stored)
        if expected is None:
            raise LLMPruneError(f"{stored}: no checksum in {schema.INDEX_NAME}")
        if f"{crc32(tensor):08x}" != expected:
            raise LLMPruneError(f"{stored} in {file}: checksum mismatch (corrupted data)")
        return tensor

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        """The stored parts (suffix -> tensor) of a pruned weight in the compressed format."""
        prefix = prefix_of(name)
        return {s[len(prefix) + 1:]: self.tensor(s) for s in self._stored_names(name)}

    def weight(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (or one expert, ``<tensor>[e]``, as ``[out, in]``) as a dense tensor; a pruned
        one is checked against its declared pattern (a fused experts tensor: each of its experts)."""
        if name in self.experts:
            n, transposed = self.experts[name]
            per_expert = [self.weight(f"{name}[{e}]") for e in range(n)]
            return torch.stack([w.T if transposed else w for w in per_expert])
        pattern: Pattern | None = self.targets.get(name)
        if pattern is None:
            return self.tensor(name)
        if self.fmt == "compressed":
            weight = decode(self.parts(name), pattern, name)
            return weight if pattern.quant is None else weight.to(self.dtype)  # codes decode in fp32
        if (split := split_expert(name)) is not None and split[0] in self.experts:
            whole = self._whole.get(split[0])
            if whole is None:  # read once for all its experts
                self._whole = {split[0]: (whole := self.tensor(split[0]))}
            weight = whole[split[1]].T if self.experts[split[0]][1] else whole[split[1]]
        else:
            weight = self.tensor(name)
        check(weight, pattern, name)
        return weight

    def mask(self, name: str) -> torch.Tensor:
        """The pruner's mask of pruned weight ``name``, as stored by the compressed format; the dense format
        stores no mask, so there it is read off the non-zeros."""
        pattern = self.targets[name]
        if self.fmt == "compressed":
            return mask_of(self.parts(name), pattern, name)
        return self.weight(name) != 0

    def stored_size(self, name: str) -> int:
        """Bytes on disk of parameter ``name`` (all its parts, headers excluded; an expert of a dense-format
        tensor: its share)."""
        if (split := split_expert(name)) is not None and split[0] in self.experts and self.fmt != "compressed":
            return self.stored_bytes[split[0]] // self.experts[split[0]][0]
        return sum(self.stored_bytes[s] for s in self._stored_names(name))
