"""Read a Hugging Face safetensors checkpoint folder one tensor at a time, after checking it whole.

Every shard's header and size are validated when the folder is opened, so a missing or truncated shard
is reported before any pruning starts instead of hours into a run.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import LLMPruneError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_MAX_HEADER = 100 * 2**20  # real headers are kilobytes; anything this large is garbage, not a header
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header, after checking the file is as long as it says."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LLMPruneError(f"{path}: truncated shard ({size} bytes, not even a header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise LLMPruneError(f"{path}: corrupt or truncated shard (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LLMPruneError(f"{path}: corrupt shard header ({e})") from e
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + n + end != size:
        raise LLMPruneError(f"{path}: corrupt or truncated shard: header promises {8 + n + end} bytes, file has {size}")
    return header


class SafetensorsDir:
    """A checkpoint folder (``model.safetensors`` or an index plus shards), validated on open: the one reader
    of safetensors folders, for the checkpoints pruned from and for llmprune's own (``export.Checkpoint``).

    ``shapes``, ``dtypes`` and ``nbytes`` describe every tensor without reading it; :meth:`load` reads a few.
    ``strict`` refuses tensors a shard holds but the index does not list (else they are ignored).
    """

    def __init__(self, path: str | os.PathLike, strict: bool = False) -> None:
        self.strict = strict
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise LLMPruneError(f"{self.path}: not a checkpoint directory")
        if (self.path / INDEX).is_file():
            try:
                weight_map = dict(json.loads((self.path / INDEX).read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as e:
                raise LLMPruneError(f"{self.path / INDEX}: malformed index ({e})") from e
        elif (self.path / SINGLE).is_file():
            weight_map = None
        else:
            raise LLMPruneError(f"{self.path}: no {SINGLE} or {INDEX} (streaming reads safetensors checkpoints)")
        self.file: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.nbytes: dict[str, int] = {}
        for shard in sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]:
            self._add_shard(shard, weight_map)
        if weight_map is not None and (missing := sorted(set(weight_map) - set(self.file))):
            raise LLMPruneError(f"{missing[0]}: listed in {INDEX} but missing from shard {weight_map[missing[0]]}")

    def _add_shard(self, shard: str, weight_map: dict[str, str] | None) -> None:
        path = self.path / shard
        if Path(shard).name != shard or not path.is_file():
            raise LLMPruneError(f"{path}: shard listed in {INDEX} is missing")
        for name, entry in read_header(path).items():
            if weight_map is not None and weight_map.get(name) != shard:
                if self.strict:
                    raise LLMPruneError(f"{name}: stored in shard {shard} but not listed in {INDEX}")
                continue  # a stray copy the index does not point at
            if entry.get("dtype") not in _DTYPES:
                raise LLMPruneError(f"{name} in {shard}: unsupported dtype {entry.get('dtype')!r}")
            self.file[name] = shard
            self.shapes[name] = tuple(entry["shape"])
            self.dtypes[name] = _DTYPES[entry["dtype"]]
            self.nbytes[name] = entry["data_offsets"][1] - entry["data_offsets"][0]

    def __contains__(self, name: str) -> bool:
        return name in self.file

    def load(self, names: Iterable[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read ``names`` (opening each shard once) straight onto ``device``."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file[name], []).append(name)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # safetensors wants an explicit index
            device = torch.device("cuda", torch.cuda.current_device())
        out: dict[str, torch.Tensor] = {}
        for shard, group in by_file.items():
            try:
                with safe_open(self.path / shard, framework="pt", device=str(device)) as f:
                    out.update((name, f.get_tensor(name)) for name in group)
            except (SafetensorError, OSError) as e:
                raise LLMPruneError(f"{self.path / shard}: cannot be read: {e}") from e
        return out
