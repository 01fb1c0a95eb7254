"""A lean decode step for Llama-family models: the forward pass a token needs and nothing else.

transformers' forward spends most of a small model's decode step on per-op bookkeeping (masks, cache
objects, hooks, dtype round trips): SmolLM2's 30 layers run ~50 torch ops each. :class:`LeanDecoder`
runs the same arithmetic on the model's own weights:

- q/k/v and gate/up stacked into one Linear each (:func:`kernels.fuse.fuse_rows`);
- a preallocated KV cache and the rotary rows of every position, computed once by the model's own rotary
  module (so llama3 / linear / dynamic scaling come for free);
- one token: one C++ call for every layer (``torch.classes.llmprune_cpu.Decoder``, ``kernels/cpu/csrc/layer.h``)
  where the kernels are built; prompts, and machines without them, run the same step in ~15 torch ops a layer;
- optionally an int8 ``lm_head`` (:class:`kernels.int8.Int8Linear`): the head is never pruned and is the
  largest matrix of a small model.

Quantized (int4 / int8) weights multiply int8-rounded tokens (``act_int8``, :func:`kernels.cpu.linear`).
Architectures: llama, mistral and qwen2 (without a sliding window shorter than the run), qwen3 (q/k norms).
:func:`lean_decoder` returns None for anything else and callers use transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu
from .kernels.fuse import fuse_rows
from .kernels.int4 import Int4Linear
from .kernels.int8 import Int8Linear
from .kernels.linear import SparseLinear

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_WEIGHT = {SparseLinear: "packed", Int4Linear: "weight4", Int8Linear: "weight8"}


def _native(module: nn.Module) -> tuple[list, list[int]] | None:
    """``module`` as ``layer_step`` takes a projection: (values, meta, scale, zero, fp32 bias) and its geometry."""
    if type(module) not in (*_WEIGHT, nn.Linear):
        return None
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    if type(module) in _WEIGHT:
        args = cpu.weight_args(getattr(module, _WEIGHT[type(module)]))
        return [*args[:4], bias], list(args[4:])
    if type(module) is nn.Linear and module.weight.dtype.is_floating_point:
        return [module.weight.detach(), None, None, None, bias], [cpu.DENSE_FLOAT, 1, 1, 1, *module.weight.shape, 0, 0]
    return None


def _bind(module: nn.Module, act_int8: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward for ``[T, K]`` inputs: the C++ op with bound arguments where it holds the weight."""
    if type(module) not in _WEIGHT or not cpu.available():
        return module
    weight = getattr(module, _WEIGHT[type(module)])
    args = cpu.weight_args(weight)
    head, tail, bias, op = args[:4], args[4:], module.bias, torch.ops.llmprune_cpu.linear
    small = {dtype: cpu.small_m_for(weight, dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    return lambda x: op(x, *head, bias, *tail, small.get(x.dtype, cpu.SMALL_M), act_int8)


def _concat(mods: list[nn.Module], act_int8: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """Projections that could not be stacked (their storage differs), called one by one."""
    fns = [_bind(m, act_int8) for m in mods]
    return lambda x: torch.cat([f(x) for f in fns], -1)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalised in fp32, scaled in the input's dtype."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class _Layer:
    def __init__(self, layer: nn.Module, act_int8: bool) -> None:
        att, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps = layer.input_layernorm.variance_epsilon
        self.q_norm, self.k_norm = getattr(att, "q_norm", None), getattr(att, "k_norm", None)
        mods = [fuse_rows([att.q_proj, att.k_proj, att.v_proj]), att.o_proj,
                fuse_rows([mlp.gate_proj, mlp.up_proj]), mlp.down_proj]
        singles = [[att.q_proj, att.k_proj, att.v_proj], None, [mlp.gate_proj, mlp.up_proj], None]
        self.qkv, self.o, self.gate_up, self.down = (_bind(m, act_int8) if m is not None else _concat(one, act_int8)
                                                     for m, one in zip(mods, singles))
        parts = [_native(m) if m is not None else None for m in mods]
        self.native = None  # (4 norms, 20 tensors, 32 numbers) as the C++ Decoder takes a layer
        if cpu.available() and all(p is not None for p in parts):
            f32 = lambda t: None if t is None else t.weight.detach().float().contiguous()  # noqa: E731
            self.native = ([f32(layer.input_layernorm), f32(layer.post_attention_layernorm), f32(self.q_norm),
                            f32(self.k_norm)], [t for p in parts for t in p[0]], [g for p in parts for g in p[1]])


class LeanDecoder:
    """Prefill then one token at a time over a static cache of ``max_len`` positions (batch 1)."""

    def __init__(self, model: nn.Module, max_len: int, lm_head: str = "dense", act_int8: bool = True) -> None:
        cfg, body = model.config, model.model
        self.act_int8 = act_int8
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.embed, self.norm = body.embed_tokens, body.norm
        self.layers = [_Layer(layer, act_int8) for layer in body.layers]
        self.native = all(layer.native is not None for layer in self.layers)
        head = Int8Linear.from_linear(model.lm_head) if lm_head == "int8" else model.lm_head
        self.lm_head = _bind(head, act_int8)
        self.max_len, self.pos = max_len, 0
        dtype = self.dtype = self.embed.weight.dtype
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        cos, sin = body.rotary_emb(torch.zeros(1), torch.arange(max_len)[None])  # fp32 [1, L, d]
        half = self.head_dim // 2
        self.cos32, self.sin32 = cos[0].contiguous(), sin[0].contiguous()
        self.cos = self.cos32.to(dtype)
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1).to(dtype)  # rotate_half as a roll
        self.cpp = None
        if self.native:  # the C++ decoder shares the caches and holds the weights' views
            lists = [[x for layer in self.layers for x in layer.native[i]] for i in range(3)]
            self.cpp = torch.classes.llmprune_cpu.Decoder(*lists, self.k[:, 0], self.v[:, 0], self.cos32, self.sin32,
                                                          cfg.hidden_size, self.heads, self.kv_heads,
                                                          self.layers[0].eps, act_int8)

    def _attention(self, i: int, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t, d, nq, nkv = x.shape[0], self.head_dim, self.heads, self.kv_heads
        q, k, v = layer.qkv(x).split([nq * d, nkv * d, nkv * d], -1)
        q, k, v = q.view(t, nq, d), k.view(t, nkv, d), v.view(t, nkv, d)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q = torch.addcmul(q * cos, q.roll(d // 2, -1), sin)
        k = torch.addcmul(k * cos, k.roll(d // 2, -1), sin)
        end = self.pos + t
        self.k[i, 0, :, self.pos:end] = k.transpose(0, 1)
        self.v[i, 0, :, self.pos:end] = v.transpose(0, 1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], self.k[i, :, :, :end], self.v[i, :, :, :end],
                                             is_causal=t > 1, enable_gqa=nq != nkv)
        return layer.o(out[0].transpose(0, 1).reshape(t, nq * d))

    def _layers_torch(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[0]
        cos, sin = self.cos[self.pos:self.pos + t, None], self.sin[self.pos:self.pos + t, None]
        for i, layer in enumerate(self.layers):
            h = h + self._attention(i, layer, _rms(h, layer.ln1, layer.eps), cos, sin)
            g, u = layer.gate_up(_rms(h, layer.ln2, layer.eps)).chunk(2, -1)
            h = h + layer.down(F.silu(g) * u)
        return h

    def _layers_native(self, h: torch.Tensor) -> torch.Tensor:
        x = h[0].float().contiguous()
        self.cpp.step(x, self.pos)
        return x.to(self.dtype)[None]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[vocab]`` of the last of ``ids`` (1-D), appended at the current position."""
        t = ids.shape[0]
        if self.pos + t > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions, {self.pos + t} asked")
        if t > 1 and self.pos:
            raise ValueError("prefill (several tokens) only from position 0")
        h = self.embed(ids)
        h = self._layers_native(h) if t == 1 and self.native else self._layers_torch(h)
        self.pos += t
        return self.lm_head(self.norm(h[-1:]))[0]


def lean_decoder(model: nn.Module, max_len: int, lm_head: str = "dense", act_int8: bool = True) -> LeanDecoder | None:
    """A :class:`LeanDecoder` for ``model``, or None where its architecture is not one it runs exactly."""
    cfg = model.config
    if cfg.model_type not in ARCHS or getattr(cfg, "hidden_act", "silu") != "silu":
        return None
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (cfg.model_type != "qwen2" or getattr(cfg, "use_sliding_window", False)) \
            and window < max_len:
        return None
    if next(model.parameters()).device.type != "cpu":
        return None
    return LeanDecoder(model, max_len, lm_head, act_int8)
