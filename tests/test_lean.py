"""The lean decode loop (llmprune/lean.py, kernels/cpu/csrc/layer.h): the same logits as transformers for every
architecture it claims and every weight storage, through the C++ decoder (one call a token) and its torch form;
stacked projections; the int8 head; refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from llmprune import LLMPruneError
from llmprune.generate import greedy
from llmprune.kernels import SparseLinear, cpu
from llmprune.kernels.fuse import fuse_rows
from llmprune.kernels.int4 import Int4Linear, quantize
from llmprune.kernels.int8 import Int8Linear
from llmprune.lean import lean_decoder
from llmprune.patterns import parse_pattern

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100, head_dim=16, max_position_embeddings=64)


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu.available(), "the C++ CPU kernels did not build"


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"attention_bias": True} if arch == "qwen2" else {}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **TINY, **extra)).eval()


def swap(model: torch.nn.Module, kind: str) -> None:
    """Every decoder Linear packed as ``kind`` (magnitude-pruned / rounded), its bias kept."""
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]:
        w, b = lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach()
        if kind.endswith("int4"):
            new = Int4Linear(quantize(w, 32, sparse=SPARSE4[kind], symmetric=False), b)
        else:
            keep = parse_pattern(kind).project(w.abs())
            new = SparseLinear.from_weight((w * keep).to(lin.weight.dtype), kind, mask=keep, bias=b)
        model.set_submodule(name, new)


def run(model: torch.nn.Module, prompt: torch.Tensor, more: list[int], native: bool) -> torch.Tensor:
    dec = lean_decoder(model, 16)
    assert dec.native  # every storage here has a C++ form
    dec.native = native
    return torch.stack([dec.step(prompt)] + [dec.step(torch.tensor([t])) for t in more]).float()


SPARSE4 = {"int4": False, "2:4+int4": True, "4x4:8+int4": "4x4:8", "unstructured+int4": "unstructured"}
CASES = [(kind, torch.float32) for kind in ("dense", "2:4", "4x4:8", "unstructured", *SPARSE4)] + \
        [(kind, torch.bfloat16) for kind in ("dense", "2:4", "unstructured")]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("kind, dtype", CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in CASES])
def test_lean_logits_equal_transformers(arch: str, kind: str, dtype: torch.dtype) -> None:
    """Prompt of 7 then 4 single tokens; the C++ layer step and the torch step against transformers' forward
    on the same modules (so int4 compares int8-rounded tokens on both sides)."""
    model = tiny(arch).to(dtype)
    if kind != "dense":
        swap(model, kind)
    prompt, more = torch.randint(0, 100, (7,), generator=torch.Generator().manual_seed(1)), [5, 6, 7, 9]
    with torch.no_grad():
        ref = model(torch.cat([prompt, torch.tensor(more)])[None]).logits[0, 6:].float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: transformers rounds every op, the C++ step doesn't
    for native in (True, False):
        got = run(model, prompt, more, native)
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_fuse_rows_equals_the_separate_projections() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    for kind in ("dense", "2:4", "4x4:8", "unstructured", *SPARSE4):
        mods = []
        for n, sym in ((32, False), (16, True), (16, False)):  # mixed symmetric / asymmetric int4 grids
            w = torch.randn(n, 64, generator=g)
            if kind == "dense":
                mods.append(torch.nn.Linear(64, n))
            elif "int4" in kind:
                mods.append(Int4Linear(quantize(w, 32, SPARSE4[kind], sym), torch.randn(n) if n == 32 else None))
            else:  # unstructured: rows keep 50 % or 75 %, strides differ
                keep = parse_pattern(kind, 0.5 if sym else 0.25 if kind == "unstructured" else None).project(w.abs())
                mods.append(SparseLinear.from_weight(w * keep, kind, mask=keep, bias=torch.randn(n, generator=g)))
        apart = torch.cat([m(x) for m in mods], -1)
        fused = fuse_rows(mods)
        assert type(fused) is type(mods[0]), kind
        torch.testing.assert_close(fused(x), apart, rtol=1e-6, atol=1e-6)
        if kind != "dense":  # the kernel modules now read their rows of the stack: one copy in memory
            big = fused.values if kind in ("2:4", "4x4:8", "unstructured") else fused.codes
            mine = [m.values if kind in ("2:4", "4x4:8", "unstructured") else m.codes for m in mods]
            assert all(t.untyped_storage().data_ptr() == big.untyped_storage().data_ptr() for t in mine)
            torch.testing.assert_close(torch.cat([m(x) for m in mods], -1), apart, rtol=1e-6, atol=1e-6)
    w = torch.randn(16, 64, generator=g)
    two = [SparseLinear.from_weight(w * parse_pattern(s).project(w.abs()), s) for s in ("2:4", "4x4:8")]
    assert fuse_rows(two) is None  # different layouts stay separate


def test_int8_head_is_close_to_the_dense_head() -> None:
    lin = torch.nn.Linear(64, 300, bias=True)
    head = Int8Linear.from_linear(lin)
    x = torch.randn(2, 64)
    head.act_int8 = False
    torch.testing.assert_close(head(x), F.linear(x, head.weight8.dequantize(), head.bias))
    err = (head(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert err < 2e-2
    head.act_int8 = True
    torch.testing.assert_close(head(x), F.linear(cpu.quantize_act(x), head.weight8.dequantize(), head.bias))


def test_greedy_lean_tokens_equal_transformers_and_bad_options() -> None:
    model = tiny("llama", seed=3)
    swap(model, "2:4")
    prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    lean, plain = greedy(model, prompt, 24), greedy(model, prompt, 24, lean=False)
    assert lean.loop == "lean" and plain.loop == "transformers" and lean.tokens == plain.tokens
    int8 = greedy(model, prompt, 24, lm_head="int8")
    assert int8.tokens[:4] == lean.tokens[:4]  # a rounded head may change a near tie later, not the first steps
    with pytest.raises(LLMPruneError, match="lm-head must be one of"):
        greedy(model, prompt, 4, lm_head="int2")
    with pytest.raises(LLMPruneError, match="needs the lean loop"):
        greedy(model, prompt, 4, lean=False, lm_head="int8")


def test_other_architectures_and_short_windows_use_transformers() -> None:
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2,
                                                                 vocab_size=50)).eval()
    assert lean_decoder(gpt2, 8) is None
    assert greedy(gpt2, torch.tensor([[1, 2, 3]]), 3).loop == "transformers"
    mistral = tiny("mistral")
    mistral.config.sliding_window = 4  # attention would see fewer positions than the cache holds
    assert lean_decoder(mistral, 16) is None


def test_cpp_decoder_refuses_shapes_that_do_not_chain() -> None:
    dec = lean_decoder(tiny("llama"), 8)
    lists = [[x for layer in dec.layers for x in layer.native[i]] for i in range(3)]
    make = torch.classes.llmprune_cpu.Decoder
    with pytest.raises(RuntimeError, match="do not chain"):  # 6 heads, not 4
        make(*lists, dec.k[:, 0], dec.v[:, 0], dec.cos32, dec.sin32, 64, 6, 2, 1e-6, True)
    with pytest.raises(RuntimeError, match="per layer"):
        make(lists[0], lists[1][:-1], lists[2], dec.k[:, 0], dec.v[:, 0], dec.cos32, dec.sin32, 64, 4, 2, 1e-6, True)
    with pytest.raises(RuntimeError, match="pos inside the cache"):
        dec.cpp.step(torch.randn(64), 8)
