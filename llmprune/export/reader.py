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
        self.fmt, self.targets = schema.declared(getattr(self.config, schema.CONFIG_KEY, None))
        index_path = self.path / schema.INDEX_NAME
        try:
            index = json.loads(index_path.read_text())
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            self._crc: dict[str, str] = dict(index["metadata"][schema.CRC_KEY])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LLMPruneError(f"{index_path}: missing or malformed index ({exc})") from exc
        self.files = SafetensorsDir(self.path, strict=True)  # shards, headers and sizes checked here
        self.stored_bytes = self.files.nbytes
        self._check_targets()

    def _stored_names(self, name: str) -> list[str]:
        """Stored tensor names holding parameter ``name``."""
        if name in self.targets and self.fmt == "compressed":
            return [f"{prefix_of(name)}.{s}" for s in parts_of(self.targets[name])]
        return [name]

    def _check_targets(self) -> None:
        for name in self.targets:
            if missing := [s for s in self._stored_names(name) if s not in self.weight_map]:
                raise LLMPruneError(f"{missing[0]}: part of pruned weight {name} is not in the checkpoint")

    def params(self) -> Iterator[str]:
        """Parameter (state-dict) names in the checkpoint, in stored order."""
        parts = {s for name in self.targets for s in self._stored_names(name)}
        yield from (n for n in self.weight_map if n not in parts)
        yield from self.targets

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
        """Parameter ``name`` as a dense tensor; a pruned one is checked against its declared pattern."""
        pattern: Pattern | None = self.targets.get(name)
        if pattern is None:
            return self.tensor(name)
        if self.fmt == "compressed":
            return decode(self.parts(name), pattern, name)
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
        """Bytes on disk of parameter ``name`` (all its parts, headers excluded)."""
        return sum(self.stored_bytes[s] for s in self._stored_names(name))
