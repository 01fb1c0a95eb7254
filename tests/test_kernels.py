"""kernels: packed layouts (pure torch), SparseLinear on CPU, dispatch, and the Triton kernels.

The Triton kernels run compiled on a GPU, else in triton's interpreter (TRITON_INTERPRET=1) on CPU;
without triton those tests skip. ``gpu``-marked tests also time nothing: they check every GPU path
against a dense matmul of the decompressed weight.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune.kernels import DispatchTable, Layout, SparseLinear, layout_for, pack, unpack
from llmprune.kernels.formats import BITMASK, SLACK
from llmprune.kernels.dispatch import layout_key, shape_class
from llmprune.patterns import parse_pattern

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if HAS_CUDA else "cpu"
SPECS = ["2:4", "4x4:8", "4:8", "1:4", "2x2:2", "8x4:16"]


def gpu_test(fn):  # noqa: ANN001, ANN201
    """Mark a test ``gpu`` (see pyproject) and skip it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")(fn))


def pruned(n: int, k: int, spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """A random weight magnitude-pruned to ``spec``, with some kept weights zeroed too."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = w * parse_pattern(spec).project(w.abs())
    w[torch.rand(n, k, generator=g) < 0.1] = 0
    return w.to(dtype=dtype, device=device)


def test_no_clash_with_hugging_face_kernels() -> None:
    """llmprune's kernels live in llmprune.kernels; Hugging Face's top-level ``kernels`` (which transformers
    imports for hub kernels) is installed beside it by the test extra and must stay importable too."""
    import kernels as hf_kernels
    from transformers.integrations import hub_kernels  # noqa: F401 - imports hf_kernels when present

    import llmprune.kernels as ours
    from llmprune.export.loader import check_kernels

    assert hf_kernels is not ours and Path(hf_kernels.__file__).parent != Path(ours.__file__).parent
    assert hasattr(hf_kernels, "get_kernel") and not hasattr(hf_kernels, "SparseLinear")
    assert ours.SparseLinear.from_weight is not None
    if not HAS_CUDA:  # our loader resolves our kernels, then refuses the missing device
        with pytest.raises(Exception, match="runs on the CPU or a CUDA device"):
            check_kernels({"w.weight": parse_pattern("2:4")}, torch.device("cuda"))


# --- layouts (CPU reference) -------------------------------------------------------------------


def test_layout_for_patterns() -> None:
    assert layout_for("2:4") == Layout("2:4", 1, 4, 2)
    assert layout_for(parse_pattern("4x4:8")) == Layout("tile", 4, 4, 8)
    assert layout_for("4:8") == Layout("tile", 1, 8, 4)
    assert layout_for("4x4:8").cols_per_word == 8 and layout_for("2:4").cols_per_word == 32
    assert layout_for("unstructured") == layout_for(parse_pattern("unstructured", 0.8)) == BITMASK
    for bad in ("8x8:32", "3x3:4", parse_pattern("unstructured", 0.0)):
        with pytest.raises(ValueError):
            layout_for(bad)


@settings(max_examples=60, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    rows=st.integers(1, 4),
    cols=st.integers(1, 12),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_roundtrip(spec: str, rows: int, cols: int, dtype: torch.dtype, seed: int) -> None:
    lay = layout_for(spec)
    w = pruned(rows * lay.r * 2, cols * lay.c, spec, dtype, seed=seed)
    packed = pack(w, lay)
    assert packed.meta.dtype == torch.int32 and packed.values.dtype == dtype
    assert packed.values.shape == (w.shape[0] // lay.r, packed.padded_k // lay.c * lay.kv)
    assert torch.equal(unpack(packed), w)


def test_24_bit_layout() -> None:
    """Group g of a row: values [2g, 2g+1] = kept weights in column order, code i0 | i1 << 2 at bits 4g."""
    w = torch.zeros(1, 32)
    w[0, :8] = torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0])  # groups (1, 3) and (0, 1): one zero kept
    packed = pack(w, layout_for("2:4"))
    assert packed.values[0, :4].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert packed.meta.shape == (1, 1)
    assert int(packed.meta[0, 0]) & 0xFF == (1 | 3 << 2) | (0 | 1 << 2) << 4


@pytest.mark.parametrize("granularity", ["row", "layer"])  # layer: rows keep different counts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_layout(granularity: str, dtype: torch.dtype) -> None:
    """Bit c % 32 of word c // 32 keeps column c; a row's kept values in column order, zeros to one stride:
    the widest row + SLACK. Every position of the mask is kept, zero-valued ones too."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 70, generator=g)
    keep = parse_pattern("unstructured", 0.6, granularity=granularity).project(w.abs())
    keep[0], keep[1] = False, True  # an empty row and a full one
    w = (w * keep).to(dtype)
    w[2, keep[2].nonzero()[0]] = 0  # a kept zero
    packed = pack(w, BITMASK, keep)
    counts = keep.sum(1)
    assert packed.values.shape == (9, 70 + SLACK) and packed.meta.shape == (9, 3)
    for r in range(9):
        word_bits = [(int(packed.meta[r, c // 32]) >> (c % 32)) & 1 for c in range(70)]
        assert word_bits == keep[r].int().tolist()
        assert torch.equal(packed.values[r, : counts[r]], w[r, keep[r]])
        assert not packed.values[r, counts[r]:].any()
    assert torch.equal(unpack(packed), w)
    with pytest.raises(ValueError, match="non-zero outside"):
        pack(w, BITMASK, keep & (torch.arange(70) > 3))


def test_tile_bit_layout() -> None:
    """4x4 tile: bit r*4 + c of its 16-bit mask, values in bit order, two tiles per int32 word."""
    w = torch.zeros(4, 8)
    w[0, 1], w[2, 3], w[3, 0] = 5.0, 6.0, 7.0  # tile 0 keeps bits 1, 11, 12 (+5 zero-valued fillers)
    w[1, 4] = 8.0  # tile 1: bit 4
    packed = pack(w, layout_for("4x4:8"))
    word = int(packed.meta[0, 0]) & 0xFFFFFFFF
    assert bin(word & 0xFFFF).count("1") == 8 and bin(word >> 16).count("1") == 8
    assert all(word >> b & 1 for b in (1, 11, 12)) and word >> 20 & 1
    tile0 = packed.values[0, :8].tolist()
    assert [v for v in tile0 if v] == [5.0, 6.0, 7.0]  # ascending bits: (0,1), (2,3), (3,0)
    assert torch.equal(unpack(packed), w)


def test_pack_rejects_unpruned() -> None:
    with pytest.raises(ValueError, match="non-zeros"):
        pack(torch.ones(4, 8), layout_for("2:4"))
    with pytest.raises(ValueError, match="tiles"):
        pack(torch.zeros(6, 8), layout_for("4x4:8"))


@pytest.mark.parametrize("spec", ["2:4", "4x4:8"])
def test_packed_bytes(spec: str) -> None:
    """Both headline formats read 1.125 bytes per fp16 weight: 0.5625x of dense."""
    packed = pack(pruned(64, 256, spec, torch.float16), layout_for(spec))
    assert packed.nbytes == 64 * 256 * 2 * 9 // 16
    assert layout_for(spec).bytes_per_weight() == 1.125


# --- SparseLinear on CPU -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["2:4", "4x4:8", "4:8"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_linear_cpu(spec: str, with_bias: bool) -> None:
    w = pruned(32, 96, spec)
    bias = torch.randn(32) if with_bias else None
    mod = SparseLinear.from_weight(w, parse_pattern(spec), bias)
    x = torch.randn(2, 3, 96)
    assert mod.kernel_for(x) == "cpu"  # the C++ kernels (tests/test_cpu_kernels.py)
    torch.testing.assert_close(mod(x), F.linear(x, w, bias))
    again = SparseLinear(mod.layout, torch.empty_like(mod.values), torch.empty_like(mod.meta), (32, 96), mod.bias)
    again.load_state_dict(mod.state_dict())
    torch.testing.assert_close(again(x), mod(x))
    half = SparseLinear.from_weight(w.half(), spec, bias).to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16
    torch.testing.assert_close(half(x.bfloat16()).float(), F.linear(x, w, bias), rtol=0.05, atol=0.3)


def test_sparse_linear_rejects() -> None:
    with pytest.raises(ValueError):
        SparseLinear.from_weight(torch.randn(8, 8), "2:4")
    with pytest.raises(ValueError):
        SparseLinear.from_weight(torch.randn(8, 8), "8x8:32")


# --- dispatch ----------------------------------------------------------------------------------


def test_dispatch_defaults_and_rules() -> None:
    lay24, lay44 = layout_for("2:4"), layout_for("4x4:8")
    table = DispatchTable()
    assert table.choose(lay24, 4096, 4096, 1) == "triton"
    # cuSPARSELt failed its GPU test (H100): no default names it, at any M
    assert table.choose(lay24, 4096, 4096, 8192) == "dense"
    assert all(k != "cusparselt" for m in (1, 64, 65, 1024, 1 << 20) for k in [table.choose(lay24, 4096, 4096, m)])
    assert table.choose(lay44, 4096, 4096, 8192) == "dense"
    table = DispatchTable({"2:4": {24: [(16, "triton"), (None, "dense")], 28: [(None, "cusparselt")]}})
    assert table.choose(lay24, 4096, 4096, 16) == "triton" and table.choose(lay24, 4096, 4096, 17) == "dense"
    assert table.choose(lay24, 8192, 28672, 1) == "cusparselt"  # nearest shape class
    assert table.choose(lay44, 4096, 4096, 1) == "triton"  # no rules for 4x4:8: defaults
    assert shape_class(4096, 4096) == 24 and layout_key(lay44) == "4x4:8"


def test_dispatch_from_rows_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def row(m: int, kernel: str, us: float, dtype: str = "fp16") -> dict:
        return {"format": "2:4", "n": 4096, "k": 4096, "m": m, "kernel": kernel, "us": us, "dtype": dtype}

    rows = [row(1, "triton", 5), row(1, "dense", 9), row(16, "triton", 6), row(16, "dense", 9)]
    rows += [row(2048, "triton", 90), row(2048, "dense", 80), row(2048, "cusparselt", 60)]
    rows += [row(1, "cublas", 1), {**row(1, "triton", 1), "e2e": True}]  # ignored: not ours / end-to-end
    table = DispatchTable.from_rows(rows)
    assert table.rules == {"2:4": {24: [(16, "triton"), (None, "cusparselt")]}}
    path = tmp_path / "dispatch.json"
    table.save(path)
    assert json.loads(path.read_text()) == {"2:4": {"24": [[16, "triton"], [None, "cusparselt"]]}}
    assert DispatchTable.load(path).rules == table.rules
    from llmprune.kernels import dispatch

    monkeypatch.setenv("LLMPRUNE_KERNELS_DISPATCH", str(path))
    dispatch.default_table.cache_clear()
    try:
        assert dispatch.default_table().rules == table.rules
    finally:
        monkeypatch.delenv("LLMPRUNE_KERNELS_DISPATCH")
        dispatch.default_table.cache_clear()


def test_benchmark_refuses_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--shapes", "7b", "--m", "1"]) == 1
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and "no CUDA" in out


# --- Triton kernels (GPU, or the interpreter on CPU) -------------------------------------------


@pytest.fixture(scope="module")
def tk():  # noqa: ANN201
    """kernels.triton_kernels: compiled on CUDA, else interpreted (TRITON_INTERPRET set while in use)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton)")
    with pytest.MonkeyPatch.context() as mp:
        if not HAS_CUDA:
            mp.setenv("TRITON_INTERPRET", "1")  # read when the kernels are defined and while they run
        # triton is installed, so a kernel module that fails to import is a failure, never a skip
        from llmprune.kernels import triton_kernels

        if not HAS_CUDA and not triton_kernels.INTERPRET:
            pytest.skip("kernels.triton_kernels was imported without TRITON_INTERPRET before this module")
        yield triton_kernels


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    tol = 2e-2 if x.dtype == torch.bfloat16 else 4e-3  # relative to the largest output
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert y.dtype == x.dtype


@pytest.mark.parametrize("spec", ["2:4", "4x4:8", "4:8", "8x4:16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [200, 256], ids=["padded-k", "even-k"])
def test_triton_unpack(tk, spec: str, dtype: torch.dtype, k: int) -> None:  # noqa: ANN001
    w = pruned(72, k - 4 * (spec == "8x4:16" and k == 200), spec, dtype, DEVICE)
    assert torch.equal(tk.unpack(pack(w, layout_for(spec))), w)


CONFIGS = {
    "gemv": (1, dict(block_m=1, block_n=32, block_k=64)),
    "gemv-splitk": (1, dict(block_m=1, block_n=32, block_k=64, split_k=3)),
    "dot": (5, dict(block_m=16, block_n=32, block_k=64)),
    "dot-splitk": (20, dict(block_m=16, block_n=32, block_k=32, split_k=2)),
    "default": (40, None),
}


@pytest.mark.parametrize("spec", ["2:4", "4x4:8", "4:8"])
@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("shape", [(64, 232), (48, 256)], ids=["padded-k", "even-k"])
def test_triton_sparse_mm(tk, spec: str, case: str, shape: tuple[int, int]) -> None:  # noqa: ANN001
    """232: K padded and the last K-block partial (masked loads); 48 x 256: rows past N, unmasked K."""
    m, cfg = CONFIGS[case]
    n, k = shape
    w = pruned(n, k, spec, torch.float16, DEVICE, seed=1)
    bias = torch.randn(n, device=DEVICE).half() if k == 232 else None
    x = torch.randn(m, k, device=DEVICE).half()
    y = tk.sparse_mm(x, pack(w, layout_for(spec)), bias, tk.Config(**cfg) if cfg else None)
    _check(y, x, w, bias)


@pytest.mark.parametrize("spec", ["2:4", "4x4:8"])
@pytest.mark.parametrize("block_m", [1, 16])
def test_triton_sparse_mm_bf16(tk, spec: str, block_m: int) -> None:  # noqa: ANN001
    if block_m > 1 and tk.INTERPRET:
        pytest.skip("triton's interpreter computes bf16 tl.dot wrongly; covered by the gpu tests")
    w = pruned(32, 128, spec, torch.bfloat16, DEVICE, seed=2)
    x = torch.randn(block_m, 128, device=DEVICE).bfloat16()
    _check(tk.sparse_mm(x, pack(w, layout_for(spec)), None, tk.Config(block_m, 32, 64)), x, w, None)


def test_triton_candidates_fit_layouts(tk) -> None:  # noqa: ANN001
    for spec in SPECS:
        lay = layout_for(spec)
        for m in (1, 4, 16, 64, 256, 8192):
            cands = tk.candidates(m, 4096, 4096, lay, 132)
            assert cands and all(c.block_n % lay.r == 0 and c.block_k % lay.cols_per_word == 0 for c in cands)
            assert all((c.block_m == 1) == (m == 1) and c.block_m >= min(m, 16) for c in cands)


# --- GPU: every path against dense matmul of the decompressed weight ---------------------------


@pytest.mark.parametrize("spec", ["2:4", "4x4:8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
@gpu_test
def test_gpu_tuned_kernels(tk, spec: str, dtype: torch.dtype, seed: int) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    n, k = (int(v) * 64 for v in torch.randint(1, 48, (2,), generator=g))
    w = pruned(n, k, spec, dtype, "cuda", seed)
    packed = pack(w, layout_for(spec))
    assert torch.equal(tk.unpack(packed), w)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    for m in (1, 3, 16, 64, 300, 2048):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        _check(tk.sparse_mm(x, packed, bias), x, w, bias)


def _paths_agree(spec: str, kernel: str, cusparselt_search: bool | None = None) -> None:
    w = pruned(512, 1024, spec, torch.float16, "cuda")
    bias = torch.randn(512, device="cuda").half()
    table = DispatchTable({layout_key(layout_for(spec)): {0: [(None, kernel)]}})
    mod = SparseLinear.from_weight(w, spec, bias, table=table, use_cusparselt=cusparselt_search is not None)
    if cusparselt_search is not None:
        from llmprune.kernels import cusparselt

        mod._cslt = cusparselt.CusparseltWeight(w, search=cusparselt_search)
    for m in (1, 7, 256, 1000):
        x = torch.randn(m, 1024, device="cuda").half()
        assert mod.kernel_for(x) == kernel
        _check(mod(x), x, w, bias)
    torch.cuda.synchronize()


@pytest.mark.parametrize("spec", ["2:4", "4x4:8"])
@pytest.mark.parametrize("kernel", ["triton", "dense"])
@gpu_test
def test_gpu_sparse_linear_paths(spec: str, kernel: str) -> None:
    if kernel == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    _paths_agree(spec, kernel)


@pytest.mark.cusparselt
@pytest.mark.parametrize("search", [False, True])
@gpu_test
def test_gpu_cusparselt(search: bool) -> None:
    """Opt-in cuSPARSELt path; run in its own process (device_run.py): a failure may poison the CUDA context."""
    from llmprune.kernels import cusparselt

    if not cusparselt.available():
        pytest.skip("needs torch built with cuSPARSELt")
    _paths_agree("2:4", "cusparselt", cusparselt_search=search)
