"""Plain ``AutoModelForCausalLM.from_pretrained(dir)`` on a compressed checkpoint, once ``import llmprune``
has run: the checkpoint's ``quantization_config`` names ``quant_method: llmprune``, registered here with
transformers' quantizer registry, and each pruned weight's stored parts (``<module>.compressed``,
``.bitmask``, ``.shape``, ``.row_offsets``) are decoded into the dense weight while transformers loads
(``dtype``, ``device_map`` and the low-memory meta-device loading work as for any checkpoint).

Without llmprune, transformers only warns about the unknown quantization method; what makes it fail is the
empty guard tensor stored under each pruned parameter's own name (:func:`~llmprune.export.codecs.guard`):
a size mismatch, an error, instead of a randomly initialised weight. Here the guard joins the parts and is
dropped, so every ``*.weight`` passes through :class:`Decompress` (the dense ones unchanged). Compressed
fused MoE experts are refused here too: ``llmprune.load`` reads them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as _auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import LLMPruneError
from . import schema
from .codecs import PARTS, QUANT_PARTS, decode

QUANT_METHOD = "llmprune"


def quantization_entry() -> dict[str, Any]:
    """What a compressed checkpoint's config.json says under ``quantization_config``."""
    return {"quant_method": QUANT_METHOD, "format": "compressed", "format_version": schema.FORMAT_VERSION}


@register_quantization_config(QUANT_METHOD)
class LLMPruneQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an llmprune compressed checkpoint (the patterns live in ``sparsity_config``).

    ``kernels`` is a loading option, never stored: ``from_pretrained(dir, device_map="cuda",
    quantization_config=LLMPruneQuantizationConfig(kernels=True))`` builds the kernels package's
    ``SparseLinear`` / ``Int4Linear`` modules for the pruned Linears, as ``llmprune.load(dir, kernels=True)``.
    """

    def __init__(self, format: str = "compressed", format_version: int = schema.FORMAT_VERSION,
                 kernels: bool = False, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format, self.format_version, self.kernels = format, format_version, kernels

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format, "format_version": self.format_version}

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"kernels": self.kernels}


# transformers applies a passed config's loading attributes over the checkpoint's only for the classes listed
# here (a private tuple: a release without it loses the kernels option, not the import).
if hasattr(_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES"):
    _auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*_auto.LOADING_ATTRIBUTES_CONFIG_TYPES, LLMPruneQuantizationConfig)


class Decompress(ConversionOps):
    """One pruned weight's stored parts -> its dense weight, verified against the declared pattern."""

    def __init__(self, quantizer: LLMPruneQuantizer) -> None:
        # Under this name transformers hands the parts over as stored, uncast (HfQuantizer.get_new_dtype): an
        # fp16 scale cast to bf16 first would decode to other weights. The decoded weight is cast here.
        self.hf_quantizer = quantizer

    def __deepcopy__(self, memo: dict) -> Decompress:
        return type(self)(self.hf_quantizer)  # transformers copies the op per weight: all report to one quantizer

    def convert(self, input_dict: dict[str, Any], model: torch.nn.Module | None = None,
                full_layer_name: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        parts = {k: v[0] if isinstance(v, list) else v for k, v in input_dict.items()}
        stored = parts.pop("weight", None)  # a dense weight, or a pruned one's empty guard
        pattern = self.hf_quantizer.targets(model).get(full_layer_name)
        if pattern is None:
            if parts or stored is None:
                raise LLMPruneError(f"{full_layer_name}: stored as compressed parts but not a declared target")
            weight = stored
        elif stored is not None and stored.numel():
            raise LLMPruneError(f"{full_layer_name}: stored both as a dense tensor and as compressed parts")
        else:
            weight = decode(parts, pattern, full_layer_name)
            if self.hf_quantizer.quantization_config.kernels:  # the kernel modules are built from the parts
                self.hf_quantizer.parts[full_layer_name] = parts
        return {"weight": weight if model is None else weight.to(model.get_parameter(full_layer_name).dtype)}


@register_quantizer(QUANT_METHOD)
class LLMPruneQuantizer(HfQuantizer):
    """Decodes llmprune's compressed weights while transformers loads; the model comes out dense."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", *PARTS, *QUANT_PARTS]}

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._targets: dict | None = None
        self.parts: dict[str, dict[str, torch.Tensor]] = {}  # kept for the kernel modules (kernels=True)

    def targets(self, model: torch.nn.Module) -> dict:
        if self._targets is None:
            sc = getattr(model.config, schema.CONFIG_KEY, None)
            _, self._targets = schema.declared(sc)
            if schema.declared_experts(sc, self._targets):
                raise LLMPruneError("this checkpoint holds compressed fused MoE experts, which plain from_pretrained "
                                    "cannot load: use llmprune.load(path), or save with --format dense")
        return self._targets

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        targets = self.targets(model)  # refuse what cannot load before reading any weight
        if self.quantization_config.kernels:
            from .loader import check_kernels

            check_kernels(targets, None)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        if self.quantization_config.kernels:
            self._swap_kernels(model)
            return
        # The weights are plain dense tensors now: the model is an ordinary one (trainable, savable, and saved
        # dense, so the decoding is not something to reverse).
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model._weight_conversions = [c for c in getattr(model, "_weight_conversions", [])
                                     if not any(isinstance(op, Decompress) for op in getattr(c, "operations", []))]

    def _swap_kernels(self, model: torch.nn.Module) -> None:
        from .codecs import mask_of
        from .loader import kernel_linear

        for name, pattern in self.targets(model).items():
            module_name = name.removesuffix(".weight")
            linear = model.get_submodule(module_name)
            if not isinstance(linear, torch.nn.Linear):
                continue
            parts = self.parts.pop(name)
            model.set_submodule(module_name, kernel_linear(name, linear, pattern, mask_of(parts, pattern, name),
                                                           parts, linear.weight.device))

    def get_load_operations(self) -> dict:
        return {"deserialize": Decompress}

    def is_serializable(self) -> bool:
        return not self.quantization_config.kernels  # kernel modules hold their own layouts

    @property
    def is_trainable(self) -> bool:
        return not self.quantization_config.kernels
