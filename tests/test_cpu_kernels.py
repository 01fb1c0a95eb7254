"""The C++ CPU kernels (llmprune/kernels/cpu): every layout and value type against a dense matmul of the
decompressed weight, on odd shapes, few and many tokens, 1 and 2 threads; the scalar decoder against the
pure-torch unpack; the loaders and ``generate`` with kernels; a failed build falling back with one warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmprune import LLMPruneError
from llmprune.kernels import SparseLinear, cpu, layout_for, pack, unpack
from llmprune.kernels.int4 import Int4Linear, quantize
from llmprune.patterns import parse_pattern

from .test_export import TOKENS, tiny_llama
from .test_kernels import pruned

SPECS = ["2:4", "4x4:8", "4:8", "1:4", "2x2:2", "8x4:16", "1x8:4", "unstructured"]
SHAPES = [(8, 36), (16, 100), (40, 232), (24, 256), (8, 4), (7, 64)]  # K off the vector width, N = r, odd N
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert cpu.available(), "the C++ CPU kernels did not build"


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):  # noqa: ANN001, ANN201
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    err = (y.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def test_threads_follow_torch(threads: int) -> None:
    assert cpu.threads_used(64) == threads


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_layouts_equal_dense_matmul(spec: str, dtype: torch.dtype, threads: int) -> None:
    lay = layout_for(spec)
    for n, k in SHAPES:
        if n % lay.r or lay.fmt != "bitmask" and k % lay.c:
            continue
        w = pruned(n, k, spec, dtype, seed=n + k)
        packed = pack(w, lay, w != 0)
        assert torch.equal(cpu.decode(packed), unpack(packed).float())
        bias = torch.randn(n).to(dtype)
        for m in (1, 2, 3, 5, 17):  # row kernels in blocks of 4, 2, 1 tokens; 17 goes through the BLAS path
            x = torch.randn(m, k).to(dtype)
            ref = F.linear(x.float(), w.float(), bias.float())
            close(cpu.linear(x, packed, bias), ref, dtype)
        close(cpu.linear(x, packed, bias, small_m=0), ref, dtype)  # prefill path on every shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitmask_rows_of_any_count(dtype: torch.dtype, threads: int) -> None:
    """Unstructured weights whose rows keep different counts (layer granularity, 30-90 %), an empty row and a
    full one: the kernels find each row's values behind its bits, on tails of 1-31 columns."""
    for n, k, sparsity in [(40, 232, 0.5), (24, 256, 0.3), (7, 33, 0.9), (5, 5, 0.6)]:
        g = torch.Generator().manual_seed(n + k)
        w = torch.randn(n, k, generator=g)
        keep = parse_pattern("unstructured", sparsity, granularity="layer").project(w.abs())
        keep[0], keep[-1] = False, True
        w = (w * keep).to(dtype)
        packed = pack(w, layout_for("unstructured"), keep)
        assert torch.equal(cpu.decode(packed), unpack(packed).float())
        for m in (1, 3, 17):
            x = torch.randn(m, k, generator=g).to(dtype)
            close(cpu.linear(x, packed), F.linear(x.float(), w.float()), dtype)


def test_a_corrupt_bitmask_reads_nothing_past_its_row() -> None:
    """Bits for more values than a row holds (all set): every path stops at the row's last value, as the
    scalar decoder does, instead of reading the next row or past the buffer."""
    w = torch.randn(16, 96)
    keep = parse_pattern("unstructured", 0.75).project(w.abs())
    packed = pack(w * keep, layout_for("unstructured"), keep)
    packed.meta.fill_(-1)
    dense = cpu.decode(packed)
    assert torch.equal(dense[:, :24] != 0, (packed.values[:, :24] != 0)) and not dense[:, 24:].any()
    x = torch.randn(3, 96)
    close(cpu.linear(x, packed), x @ dense.T, torch.float32)


@pytest.mark.parametrize("sparse", [False, True, "4x4:8", "unstructured"],
                         ids=["int4", "2:4+int4", "4x4:8+int4", "unstructured+int4"])
@pytest.mark.parametrize("group_size", [32, 48, 128, -1])  # 48: groups off the 32-column step (scalar path)
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_equals_dense_matmul_of_the_dequantized_weight(sparse: bool | str, group_size: int, symmetric: bool,
                                                           threads: int) -> None:
    odd = sparse in (False, "unstructured")  # K off 4 columns
    for n, k in [(8, 576), (12, 100), (4, 36)] + ([(4, 33), (3, 7)] if odd else []):
        w4 = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(k)),
                      k if group_size < 0 else group_size, sparse, symmetric)
        ref_w = w4.dequantize()
        torch.testing.assert_close(cpu.decode(w4), ref_w, rtol=0, atol=1e-6)
        for m in (1, 3, 17):
            x = torch.randn(m, k)
            close(cpu.linear(x, w4, act_int8=False), x @ ref_w.T, torch.float32)
        close(cpu.linear(x.bfloat16(), w4), x.bfloat16().float() @ ref_w.T, torch.bfloat16)


Q8_CASES = [(kind, gs, sym) for kind in ("int4", "2:4+int4") for gs in (32, 64, 48, 128, -1) for sym in (False, True)]
Q8_CASES += [(kind, gs, False) for kind in ("4x4:8+int4", "unstructured+int4") for gs in (32, -1)]  # float path


@pytest.mark.parametrize("kind, group_size, symmetric", Q8_CASES + [("int8", -1, True)])  # int8: per row, symmetric
def test_int8_activations_equal_the_matmul_of_rounded_tokens(kind: str, group_size: int, symmetric: bool,
                                                             threads: int) -> None:
    """act_int8: integer kernels (or the float path on rounded tokens where none fits: 2:4 groups of 32 or 48)
    = dequantized weight @ the tokens rounded per 32 columns (quantize_act), for 1..16 tokens; 17 tokens take
    the fp32 BLAS path."""
    from llmprune.kernels.int8 import quantize8

    shapes = [(8, 576), (12, 100), (5, 96), (3, 256), (4, 36)] + ([(4, 33), (3, 7)] if kind != "2:4+int4" else [])
    sparse = {"2:4+int4": True, "4x4:8+int4": "4x4:8", "unstructured+int4": "unstructured"}.get(kind, False)
    for n, k in shapes:  # 576, 256: whole 64-column steps; 96, 100, 36: a 32-column tail (2:4 falls back)
        if sparse == "4x4:8" and (n % 4 or k % 4):
            continue
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * k))
        gs = k if group_size < 0 else group_size
        wq = quantize8(w) if kind == "int8" else quantize(w, gs, sparse, symmetric)
        ref_w = wq.dequantize()
        for m in (1, 2, 3, 5, 16, 17):
            x = torch.randn(m, k) * torch.linspace(0.1, 30, k)  # blocks of very different ranges
            xr = cpu.quantize_act(x) if m <= 16 else x
            close(cpu.linear(x, wq), xr @ ref_w.T, torch.float32)
            assert (xr - x).abs().max() <= x.abs().max() / 254 + 1e-6  # half a step of the coarsest block


@pytest.mark.parametrize("sparse", [False, True], ids=["int8", "2:4+int8"])
def test_int8_codes_equal_their_formula(sparse: bool, threads: int) -> None:
    g = torch.Generator().manual_seed(3)
    n, k, gs = 8, 100, 32
    groups = -(-k // gs)
    scale, zero = torch.rand(n, groups, generator=g).half() + 0.01, torch.randint(0, 256, (n, groups), generator=g)
    col_scale = scale.float().repeat_interleave(gs, 1)[:, :k]
    col_zero = zero.float().repeat_interleave(gs, 1)[:, :k]
    if sparse:
        keep = parse_pattern("2:4").project(torch.randn(n, k, generator=g).abs())  # exactly 2 of 4: no spare slots
        packed = pack(torch.randint(1, 256, (n, k), generator=g).float() * keep, layout_for("2:4"), keep)
        codes, meta, kind, geometry = packed.values.to(torch.uint8), packed.meta, cpu.ops.NM24, (1, 4, 2)
        dense_codes = unpack(packed)
    else:
        dense_codes = torch.randint(0, 256, (n, k), generator=g).float()
        codes, meta, kind, geometry, keep = dense_codes.to(torch.uint8), None, cpu.ops.DENSE, (1, 1, 1), True
    ref_w = torch.where(torch.as_tensor(keep), (dense_codes - col_zero) * col_scale, 0.0)
    args = (codes, meta, scale, zero.to(torch.uint8), kind, *geometry, n, k, 8, gs)
    torch.testing.assert_close(torch.ops.llmprune_cpu.decode(*args), ref_w)
    for m in (1, 5):
        x = torch.randn(m, k)
        y = torch.ops.llmprune_cpu.linear(x, *args[:4], None, *args[4:], 16, False)
        close(y, x @ ref_w.T, torch.float32)


def test_bad_arguments_are_refused_by_the_op() -> None:
    packed = pack(pruned(8, 32, "2:4"), layout_for("2:4"))
    with pytest.raises(RuntimeError, match="x must be"):
        cpu.linear(torch.randn(1, 31), packed)
    with pytest.raises(RuntimeError, match="meta must be"):
        torch.ops.llmprune_cpu.linear(torch.randn(1, 32), packed.values, packed.meta[:4], None, None, None,
                                      0, 1, 4, 2, 8, 32, 0, 0, 16, True)


@pytest.mark.parametrize("spec", ["2:4", "4x4:8", "4:8", "unstructured"])
def test_sparse_linear_runs_the_cpu_kernel(spec: str) -> None:
    w = pruned(32, 96, spec)
    mod = SparseLinear.from_weight(w.bfloat16(), spec, torch.randn(32).bfloat16())
    x = torch.randn(2, 5, 96).bfloat16()
    assert mod.kernel_for(x) == "cpu"
    close(mod(x).reshape(10, 32), F.linear(x.float(), w.bfloat16().float(), mod.bias.float()).reshape(10, 32),
          torch.bfloat16)


def test_int4_linear_runs_the_cpu_kernel() -> None:
    w4 = quantize(torch.randn(64, 128), 64, sparse=True)
    bias = torch.randn(64)
    x = torch.randn(3, 128)
    mod = Int4Linear(w4, bias)
    assert mod.act_int8  # the default: int8-rounded tokens
    close(mod(x), F.linear(cpu.quantize_act(x), w4.dequantize(), bias), torch.float32)
    mod.act_int8 = False
    close(mod(x), F.linear(x, w4.dequantize(), bias), torch.float32)


@pytest.mark.parametrize("mixed", [False, True], ids=["2:4", "mixed"])  # mixed: 2:4, 4x4:8, 4:8, unstructured 70 %
def test_load_with_kernels_on_the_cpu(mixed: bool, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmprune.export import load, save_pruned
    from llmprune.export.hf import LLMPruneQuantizationConfig

    model, patterns = tiny_llama(tied=False, mixed=mixed)
    out = save_pruned(model, None, tmp_path / "ckpt", "compressed", patterns)
    want = load(out)(TOKENS).logits
    fast = load(out, kernels=True)
    assert {type(fast.get_submodule(n.removesuffix(".weight"))) for n in patterns} == {SparseLinear}
    torch.testing.assert_close(fast(TOKENS).logits, want, rtol=1e-4, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(out, quantization_config=LLMPruneQuantizationConfig(kernels=True))
    assert {type(plain.get_submodule(n.removesuffix(".weight"))) for n in patterns} == {SparseLinear}
    torch.testing.assert_close(plain(TOKENS).logits, want, rtol=1e-4, atol=1e-4)


def test_kernels_refuse_unsupported_and_dense_checkpoints_in_one_line(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llmprune.export import load, save_pruned
    from llmprune.export.hf import LLMPruneQuantizationConfig

    import llmprune
    from llmprune import PruneConfig

    from .test_quant import CALIB, tiny_model

    result = llmprune.prune(tiny_model(), None, PruneConfig(pattern="2:4", quant="int8", group_size=32, batch_size=4),
                            calib=CALIB, quiet=True)
    out = result.save(tmp_path / "s8")
    with pytest.raises(LLMPruneError, match=r"q_proj.weight: the kernels run unstructured, N:M .*not 2:4\+int8"):
        load(out, kernels=True)
    with pytest.raises(LLMPruneError, match="q_proj.weight: the kernels run"):
        AutoModelForCausalLM.from_pretrained(out, quantization_config=LLMPruneQuantizationConfig(kernels=True))
    model, patterns = tiny_llama(tied=False, mixed=False)
    dense = {name: parse_pattern("unstructured", 0.0) for name in patterns}
    out = save_pruned(model, None, tmp_path / "dense", "compressed", dense)
    with pytest.raises(LLMPruneError, match="needs a pruned or quantized checkpoint"):
        load(out, kernels=True)


def test_generate_tokens_equal_with_kernels_on_and_off(tmp_path: Path) -> None:
    from llmprune.export import load, save_pruned
    from llmprune.generate import greedy

    model, patterns = tiny_llama(tied=True, mixed=False)
    out = save_pruned(model, None, tmp_path / "ckpt", "compressed", patterns)
    prompt = TOKENS[:1, :5]
    on, off = greedy(load(out, kernels=True), prompt, 32), greedy(load(out), prompt, 32)
    assert on.tokens == off.tokens and len(on.tokens) == 32
    assert on.prefill_tokens_per_s > 0 and on.decode_tokens_per_s > 0


@pytest.mark.slow
def test_generate_cli_and_its_bad_input(tmp_path: Path) -> None:
    from llmprune.export import save_pruned

    model, patterns = tiny_llama(tied=True, mixed=False)
    out = save_pruned(model, None, tmp_path / "ckpt", "compressed", patterns)
    run = [sys.executable, "-m", "llmprune", "generate"]
    bad = subprocess.run([*run, "--model", str(tmp_path / "nope"), "--prompt", "hi"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"llmprune: error: model not found: "
                                                                       f"{tmp_path / 'nope'}"]
    empty = subprocess.run([*run, "--model", str(out), "--prompt", " "], capture_output=True, text=True)
    assert empty.returncode == 2 and empty.stderr.strip() == "llmprune: error: --prompt is empty"
    head = subprocess.run([*run, "--model", str(out), "--prompt", "hi", "--lm-head", "int2"], capture_output=True,
                          text=True)
    assert head.returncode == 2 and len(head.stderr.strip().splitlines()) == 1 and "--lm-head" in head.stderr


@pytest.mark.slow
def test_a_failed_build_falls_back_with_one_warning(tmp_path: Path) -> None:
    """No compiler: one warning line, and SparseLinear still computes the right result (pure torch)."""
    code = ("import warnings, torch, torch.nn.functional as F\n"
            "from llmprune.kernels import SparseLinear\n"
            "w = torch.randn(8, 32); w = w * (w.abs() >= w.abs().reshape(8, 8, 4).kthvalue(3, -1, keepdim=True)"
            ".values.repeat_interleave(4, -1).reshape(8, 32))\n"
            "mod = SparseLinear.from_weight(w, '2:4'); x = torch.randn(2, 32)\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    assert mod.kernel_for(x) == 'torch' and mod.kernel_for(x) == 'torch'\n"
            "torch.testing.assert_close(mod(x), F.linear(x, w))\n"
            "print(len(seen), seen[0].message)\n")
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 llmprune: the C++ CPU kernels could not be built")


@pytest.mark.slow
def test_pruned_smollm2_greedy_tokens_equal_with_kernels_on_and_off(smollm2, tmp_path: Path) -> None:
    from llmprune import PruneConfig, prune
    from llmprune.export import load
    from llmprune.generate import greedy

    model, tokenizer = smollm2
    import copy

    result = prune(copy.deepcopy(model), tokenizer, PruneConfig(method="magnitude", pattern="2:4", nsamples=1,
                                                                seqlen=32, data_dir="../shared/data"))
    result.save(tmp_path / "ckpt")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    on, off = greedy(load(tmp_path / "ckpt", kernels=True), ids, 32), greedy(load(tmp_path / "ckpt"), ids, 32)
    assert on.tokens == off.tokens


@pytest.mark.parametrize("pattern, sparsity", [("2:4", None), ("unstructured", 0.0), ("4x4:8", None),
                                               ("unstructured", 0.6)],
                         ids=["2:4+int4", "int4", "4x4:8+int4", "unstructured+int4"])
def test_load_with_kernels_runs_int4_checkpoints_on_the_cpu(pattern: str, sparsity: float | None,
                                                           tmp_path: Path) -> None:
    import llmprune
    from llmprune import PruneConfig

    from .test_quant import CALIB, tiny_model

    result = llmprune.prune(tiny_model(), None, PruneConfig(pattern=pattern, sparsity=sparsity, quant="int4",
                                                            group_size=32, batch_size=4), calib=CALIB, quiet=True)
    out = result.save(tmp_path / "q")
    fast = llmprune.load(out, kernels=True)
    assert isinstance(fast.model.layers[0].mlp.down_proj, Int4Linear)
    with torch.no_grad():
        torch.testing.assert_close(fast(CALIB[:1]).logits, llmprune.load(out)(CALIB[:1]).logits, rtol=1e-4, atol=1e-4)
