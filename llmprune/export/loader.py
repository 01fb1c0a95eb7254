"""Load a saved checkpoint back into a transformers model, bit-exactly and with every layer verified."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from accelerate import init_empty_weights
from torch import nn

from ..errors import LLMPruneError
from ..models import DTYPES
from ..patterns import Pattern
from .codecs import decode, encode, parts_of
from .reader import Checkpoint


class CompressedLinear(nn.Module):
    """A Linear whose weight stays compressed (the stored parts, as buffers named like the checkpoint's
    ``<prefix>.compressed`` etc.) and is decompressed on the fly in ``forward``: the reference path the
    sparse kernels replace."""

    def __init__(self, parts: dict[str, torch.Tensor], pattern: Pattern, bias: torch.Tensor | None,
                 name: str = "weight") -> None:
        super().__init__()
        self.pattern, self.name = pattern, name
        for suffix in parts_of(pattern):
            self.register_buffer(suffix, parts[suffix])
        self.out_features, self.in_features = (int(v) for v in parts["shape"].flatten())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, pattern: Pattern, name: str = "weight",
                    mask: torch.Tensor | None = None) -> CompressedLinear:
        return cls(encode(linear.weight.detach(), pattern, name, mask), pattern,
                   None if linear.bias is None else linear.bias.detach(), name)

    def decompress(self) -> torch.Tensor:
        """The dense weight (the parts were verified when built, so no data checks here)."""
        return decode({s: getattr(self, s) for s in parts_of(self.pattern)}, self.pattern, self.name, verify=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.decompress().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}"


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise LLMPruneError(f"unknown floating dtype {dtype!r}; choose {', '.join(DTYPES)}")
    return DTYPES[name]


def check_kernels(targets: dict[str, Pattern], device: torch.device | None) -> None:
    """Refuse ``kernels=True`` in one line, before any weight is read, where the kernel modules can't run it
    (``device`` None: where transformers' ``device_map`` puts the model, which it checks itself)."""
    from ..kernels.linear import unsupported

    if device is not None and (device.type not in ("cpu", "cuda")
                               or device.type == "cuda" and not torch.cuda.is_available()):
        raise LLMPruneError(f"kernels=True runs on the CPU or a CUDA device (got device={device}, "
                            f"CUDA {'available' if torch.cuda.is_available() else 'not available'})")
    if not any(p.structured or p.sparsity > 0 or p.quant is not None for p in targets.values()):
        raise LLMPruneError("kernels=True needs a pruned or quantized checkpoint: this one has no pruned layers "
                            "(load it without kernels=True)")
    for name, pattern in targets.items():
        if name.endswith(".weight") and (reason := unsupported(pattern)):
            raise LLMPruneError(f"kernels=True: {name}: {reason}")


def kernel_linear(name: str, linear: nn.Linear, pattern: Pattern, mask: torch.Tensor,
                  parts: dict[str, torch.Tensor] | None, device: torch.device) -> nn.Module:
    """The kernels package's module for pruned Linear ``name`` on ``device`` (CPU or CUDA): ``Int4Linear`` from
    the stored ``parts`` of a quantized pattern, else ``SparseLinear`` from the weight and the pruner's ``mask``."""
    from ..kernels import SparseLinear

    bias = None if linear.bias is None else linear.bias.detach().to(device)
    if pattern.quant is not None:
        from ..kernels.int4 import Int4Linear, from_parts

        try:
            packed = from_parts(parts, pattern)
        except ValueError as exc:
            raise LLMPruneError(f"{name}: {exc}") from exc
        return Int4Linear(packed, bias).to(device)
    return SparseLinear.from_weight(linear.weight.detach().to(device), pattern, bias, mask=mask.to(device))


def _skeleton(config: transformers.PretrainedConfig) -> nn.Module:
    """The model class from ``config`` with parameters on the meta device (no memory, no random init);
    buffers such as rotary frequencies are still computed for real."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    try:
        with init_empty_weights(include_buffers=False):
            return cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LLMPruneError(f"cannot build a model from config.json ({arch or config.model_type}): {exc}") from exc


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         compressed_modules: bool = False, kernels: bool = False) -> nn.Module:
    """Load a checkpoint saved by llmprune (either format) as an eval-mode transformers model.

    ``dtype`` casts floating parameters (default: as stored). ``compressed_modules`` keeps pruned Linears
    as :class:`CompressedLinear`; ``kernels`` swaps in the kernels package's ``SparseLinear`` / ``Int4Linear``
    (C++ kernels on the CPU, Triton on CUDA).
    """
    dtype, device = _dtype(dtype), torch.device(device)
    if kernels and compressed_modules:
        raise LLMPruneError("choose either compressed_modules or kernels, not both")
    ckpt = Checkpoint(path)
    if kernels:
        check_kernels(ckpt.targets, device)  # refuse before reading any weight
    config = ckpt.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the model comes out dense (or with llmprune's own sparse modules)
    model = _skeleton(config)
    expected = model.state_dict()
    state = {}
    for name in ckpt.params():
        if name not in expected:
            raise LLMPruneError(f"{name} in {ckpt.weight_map.get(name, 'the checkpoint')}: not a parameter of "
                                f"{type(model).__name__} as config.json describes it")
        tensor = ckpt.weight(name)
        if tensor.shape != expected[name].shape:
            raise LLMPruneError(f"{name}: stored shape {tuple(tensor.shape)} but config.json implies "
                                f"{tuple(expected[name].shape)}")
        state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied weights (lm_head = embed_tokens) were stored once
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    if missing := [n for n, t in tensors if t.is_meta]:
        raise LLMPruneError(f"{missing[0]}: missing from the checkpoint at {ckpt.path}")
    for name, pattern in ckpt.targets.items():
        module_name = name.removesuffix(".weight")
        linear = model.get_submodule(module_name) if name.endswith(".weight") else None
        if not isinstance(linear, nn.Linear) or not (compressed_modules or kernels):
            continue
        mask = ckpt.mask(name)  # the pruner's own positions, never guessed from zeros
        if kernels:
            swapped = kernel_linear(name, linear, pattern, mask, ckpt.parts(name) if pattern.quant else None, device)
        elif ckpt.fmt == "compressed":  # the stored parts as they are (a quantized weight's codes and grid too)
            swapped = CompressedLinear(ckpt.parts(name), pattern, None if linear.bias is None else linear.bias.detach(), name)
        else:
            swapped = CompressedLinear.from_linear(linear, pattern, name, mask)
        model.set_submodule(module_name, swapped)
    return model.to(device).eval()
