"""Read a checkpoint stored in the hub's layout as the model's own tensors, a few at a time.

Most MoE checkpoints on the hub store each expert as its own Linears (``mlp.experts.3.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.3.w1.weight``) while transformers 5 holds them fused
(``mlp.experts.gate_up_proj [E, 2I, H]``). ``from_pretrained`` converts the whole model with the
conversion mapping transformers ships per architecture; for streaming, :class:`ConvertedSource` applies
the same mapping to just the tensors asked for (one block's), so a block is read, converted and pruned
without the rest of the model in memory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import LLMPruneError
from ..shards import SafetensorsDir


class ConvertedSource:
    """``src`` seen through ``model``'s conversion mapping: :meth:`load` takes the model's tensor names."""

    def __init__(self, model: nn.Module, src: SafetensorsDir) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.src, self.model = src, model
        expected = model.state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in expected.items()}
        direct = [n for n in src.shapes if n in expected]
        # Only a checkpoint that lacks some of the model's names needs converting.
        conversions = get_model_conversion_mapping(model) if len(direct) < len(expected) else []
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.sources: dict[str, list[tuple[str, str | None]]] = {n: [(n, None)] for n in direct}
        self.converter: dict[str, WeightConverter] = {}
        for key in src.shapes:
            if key in expected:
                continue
            target, pattern = rename_source_key(key, renamings, converters)
            if target not in expected:
                continue
            self.sources.setdefault(target, []).append((key, pattern))
            if pattern is not None:
                self.converter.setdefault(target, by_pattern[pattern])

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape of a tensor read as is (``None`` for a converted one: known once converted)."""
        return self.src.shapes[name] if self.sources.get(name) == [(name, None)] else None

    def load(self, names: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.sources]
        if missing:
            raise LLMPruneError(f"{missing[0]}: missing from the checkpoint at {self.src.path}")
        plain = [n for n in names if n not in self.converter]
        out = {n: t for n, t in self.src.load([self.sources[n][0][0] for n in plain], device).items()}
        out = {n: out[self.sources[n][0][0]] for n in plain}
        for name in (n for n in names if n in self.converter):
            converter = copy.deepcopy(self.converter[name])  # converters collect state: one per tensor
            keys = sorted(self.sources[name], key=lambda kp: _natural(kp[0]))
            tensors = self.src.load([k for k, _ in keys], device)
            for key, pattern in keys:
                converter.add_tensor(name, key, pattern, tensors[key])
            converted = converter.convert(name, model=self.model, config=self.model.config)
            if name not in converted or tuple(converted[name].shape) != self.shapes[name]:
                raise LLMPruneError(f"{name}: transformers' conversion of its {len(keys)} stored tensors gives "
                                    f"{tuple(converted[name].shape) if name in converted else 'nothing'}, but "
                                    f"config.json implies {self.shapes[name]}")
            out[name] = converted[name]
        return out


def _natural(key: str) -> list:
    """``experts.10`` after ``experts.9``: the order transformers merges expert lists in."""
    return [int(p) if p.isdigit() else p for p in key.split(".")]
