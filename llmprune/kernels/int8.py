"""int8 weight-only Linear (one fp16 scale a row): the ``lm_head`` option of the CPU decode loop.

A vocabulary-sized head is the largest single matrix of a small model (SmolLM2: 28 M of its 135 M weights)
and it is never pruned; stored as int8 it reads a quarter of fp32's bytes. Codes are unsigned (``q + 128``)
so the CPU kernels' dense int8 row kernel (symmetric zero 128) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int8Weight:
    codes: torch.Tensor  # uint8 [N, K]: round(w / scale) + 128
    scale: torch.Tensor  # fp16 [N, 1]
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() - 128.0) * self.scale.float()


def quantize8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8 codes of ``weight`` [N, K]."""
    w = weight.detach().float()
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp_min(1e-8).half()
    codes = (w / scale.float()).round().clamp(-127, 127) + 128
    return Int8Weight(codes.to(torch.uint8).contiguous(), scale.contiguous(), tuple(w.shape))


class Int8Linear(torch.nn.Module):
    """``x @ W.T`` with W int8 per row: the C++ kernels on the CPU, the dequantised weight elsewhere."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scale", weight.scale)
        self.register_buffer("bias", bias)
        self.act_int8 = True  # CPU, few tokens: multiply int8-rounded tokens (kernels.cpu.linear); False: fp32

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8Linear:
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(quantize8(linear.weight), bias)

    @property
    def weight8(self) -> Int8Weight:
        return Int8Weight(self.codes, self.scale, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import cpu

        flat = x.reshape(-1, self.in_features)
        if flat.device.type == "cpu" and flat.shape[0] and cpu.available():
            y = cpu.linear(flat, self.weight8, self.bias, act_int8=self.act_int8)
        else:
            y = torch.nn.functional.linear(flat, self.weight8.dequantize().to(flat.dtype),
                                           None if self.bias is None else self.bias.to(flat.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row"
