"""Sparsity and quantization together: the grid, the joint methods, packed checkpoints and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llmprune
from llmprune import LLMPruneError, PruneConfig
from llmprune.export import codecs, inspect
from llmprune.kernels import HAS_TRITON
from llmprune.methods import METHODS, LayerStats, reconstruction_error
from llmprune.methods.admm import ADMMConfig
from llmprune.methods.grid_refine import refine_on_grid
from llmprune.patterns import parse_pattern
from llmprune.quant import QuantSpec, parse_quant

from .conftest import tiny_model
from .test_methods import _layer

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(0))
SPECS = {"0%": ("unstructured", 0.0), "row50": ("unstructured", 0.5), "2:4": ("2:4", None), "4x4:8": ("4x4:8", None)}


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    return _layer(out_f=64, in_f=192)  # 192 = 1.5 groups of 128: a short last group


def _pattern(key: str, quant: QuantSpec | None):
    return parse_pattern(*SPECS[key], quant=quant)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("key", ["row50", "2:4", "4x4:8"])
def test_joint_projection_keeps_the_pattern_and_lands_on_the_grid(key, symmetric):
    w = torch.randn(32, 192, generator=torch.Generator().manual_seed(1))
    p = _pattern(key, QuantSpec(4, 64, symmetric))
    mask = p.project(w.abs())
    wq, grid = p.quant.project(w, mask)
    assert p.violations(wq) == 0 and not wq[~mask].any()
    assert p.quant.off_grid(wq, mask, grid) == 0 and grid.scale.shape == (32, 3)
    codes = p.quant.codes(wq, grid)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    # the range search never rounds worse than the plain min-max (or absmax) grid, group by group
    plain = p.quant._minmax(w, mask)
    err = lambda g: p.quant._grouped(torch.where(mask, p.quant.round(w, g) - w, 0.0) ** 2).sum(-1)  # noqa: E731
    assert bool((err(grid) <= err(plain)).all()) and float(err(grid).sum()) < float(err(plain).sum())
    # onto a fixed grid projecting twice changes nothing; the symmetric fit is idempotent outright
    assert torch.equal(p.quant.round(wq, grid) * mask, wq)
    if symmetric:
        again, grid2 = p.quant.project(wq, mask)
        assert torch.equal(again, wq) and torch.equal(grid2.scale, grid.scale)


@pytest.mark.parametrize("key", list(SPECS))
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_ends_exactly_on_pattern_and_grid(name, key, layer):
    w, xtx = layer
    p = _pattern(key, QuantSpec(4, 128))
    method = METHODS[name]
    res = method.fn(w.clone(), LayerStats.from_xtx(xtx), p, method.default_config())
    assert res.grid is not None and res.grid.scale.shape == (64, 2)
    assert p.violations(res.weight) == 0 and not res.weight[~res.mask].any()
    assert p.quant.off_grid(res.weight, res.mask, res.grid) == 0
    assert torch.equal(res.grid.scale.half().float(), res.grid.scale)  # scales are fp16 values


@pytest.mark.parametrize("key", ["2:4", "4x4:8", "row50"])
def test_joint_methods_beat_round_to_nearest(key, layer):
    w, xtx = layer
    p = _pattern(key, QuantSpec(4, 128))
    err = {n: reconstruction_error(w, METHODS[n].fn(w.clone(), LayerStats.from_xtx(xtx), p,
                                                   METHODS[n].default_config()).weight, xtx)
           for n in ("admm", "sparsegpt", "wanda")}
    # On this ill-conditioned synthetic layer the int4 error dominates and sparsegpt's joint sweep beats admm;
    # on real SmolLM2 layers admm's is the lower (benchmarks/NOTES_admm.md §quantization).
    assert max(err["admm"], err["sparsegpt"]) < 0.8 * err["wanda"]
    fp = reconstruction_error(w, METHODS["admm"].fn(w.clone(), LayerStats.from_xtx(xtx), _pattern(key, None),
                                                    ADMMConfig()).weight, xtx)
    assert fp < err["admm"]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("key", ["0%", "2:4", "4x4:8", "row50"])
def test_grid_refinement_lowers_the_error_every_round_and_keeps_support_and_grid(key, symmetric, layer):
    w, xtx = layer
    p = _pattern(key, QuantSpec(4, 128, symmetric))
    swept = METHODS["admm"].fn(w.clone(), LayerStats.from_xtx(xtx), p, ADMMConfig(grid_rounds=0))
    errors = [reconstruction_error(w, swept.weight, xtx)]
    for rounds in (1, 2):
        wr, grid = refine_on_grid(swept.weight, w, xtx, swept.mask, p.quant, swept.grid, rounds)
        assert p.violations(wr) == 0 and not wr[~swept.mask].any()
        assert p.quant.off_grid(wr, swept.mask, grid) == 0 and torch.equal(grid.zero, swept.grid.zero)
        assert torch.equal(grid.scale.half().float(), grid.scale)
        errors.append(reconstruction_error(w, wr, xtx))
    assert errors[2] <= errors[1] < 0.99 * errors[0], errors
    # and it is what admm does by default
    default = METHODS["admm"].fn(w.clone(), LayerStats.from_xtx(xtx), p, ADMMConfig())
    assert reconstruction_error(w, default.weight, xtx) == pytest.approx(errors[2], rel=1e-5)


def test_int8_alone_stays_close_to_dense_and_gptq_beats_rounding(layer):
    w, xtx = layer
    p = _pattern("0%", QuantSpec(8, 128))
    gptq = METHODS["gptq"].fn(w.clone(), LayerStats.from_xtx(xtx), p, METHODS["gptq"].default_config())
    rtn = METHODS["magnitude"].fn(w.clone(), LayerStats(), p, METHODS["magnitude"].default_config())
    assert bool(gptq.mask.all()) and reconstruction_error(w, gptq.weight, xtx) < 1e-4
    assert (rtn.weight - w).abs().max() < 0.005 * w.abs().max()  # half an int8 step of the largest row
    p4 = _pattern("0%", QuantSpec(4, 128))
    e_gptq = reconstruction_error(w, METHODS["gptq"].fn(w.clone(), LayerStats.from_xtx(xtx), p4,
                                                        METHODS["gptq"].default_config()).weight, xtx)
    e_rtn = reconstruction_error(w, METHODS["magnitude"].fn(w.clone(), LayerStats(), p4,
                                                            METHODS["magnitude"].default_config()).weight, xtx)
    assert e_gptq < e_rtn and reconstruction_error(w, rtn.weight, xtx) < 1e-4


def test_gptq_keeps_a_pruned_models_mask(layer):
    w, xtx = layer
    p = _pattern("2:4", None)
    pruned = METHODS["admm"].fn(w.clone(), LayerStats.from_xtx(xtx), p, ADMMConfig())
    q = METHODS["gptq"].fn(pruned.weight.clone(), LayerStats.from_xtx(xtx), _pattern("2:4", QuantSpec(4, 128)),
                           METHODS["gptq"].default_config())
    assert torch.equal(q.mask, pruned.mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, False)])
@pytest.mark.parametrize("key", list(SPECS))
def test_codes_round_trip_bit_exactly(key, bits, symmetric, dtype, layer):
    w, xtx = layer
    p = _pattern(key, QuantSpec(bits, 64, symmetric))
    res = METHODS["sparsegpt"].fn(w.clone(), LayerStats.from_xtx(xtx), p, METHODS["sparsegpt"].default_config())
    weight = res.weight.to(dtype)
    parts = codecs.encode(weight, p, "x", res.mask, res.grid)
    assert parts["codes"].dtype == torch.uint8 and parts["grid_scale"].dtype == torch.float16
    assert ("grid_zero" in parts) != symmetric
    assert torch.equal(codecs.decode(parts, p, "x").to(dtype), weight)
    assert torch.equal(codecs.mask_of(parts, p, "x"), res.mask)


def test_encode_refuses_weights_off_the_grid(layer):
    w, xtx = layer
    p = _pattern("2:4", QuantSpec(4, 128))
    res = METHODS["admm"].fn(w.clone(), LayerStats.from_xtx(xtx), p, ADMMConfig())
    nudged = res.weight.clone()
    nudged[res.mask.nonzero()[0].tolist()[0], res.mask.nonzero()[0].tolist()[1]] += 1e-3
    with pytest.raises(LLMPruneError, match="1 kept weight"):
        codecs.encode(nudged, p, "x", res.mask, res.grid)
    with pytest.raises(LLMPruneError, match="needs its quantization grid"):
        codecs.encode(res.weight, p, "x", res.mask, None)


def test_bytes_per_weight_of_2_4_int4_g128():
    p = parse_pattern("2:4", quant=QuantSpec(4, 128))
    w, mask = torch.randn(256, 4096), None
    mask = p.project(w.abs())
    wq, grid = p.quant.project(w, mask)
    parts = codecs.encode(wq, p, "x", mask, grid)
    per_weight = sum(t.numel() * t.element_size() for k, t in parts.items() if k != "shape") / w.numel()
    assert per_weight == pytest.approx(0.25 + 0.125 + 3 / 128)  # codes + bitmask + fp16 scales + zeros ≈ 0.40 B
    sym = parse_pattern("2:4", quant=QuantSpec(4, 128, symmetric=True))
    wq, grid = sym.quant.project(w, mask)
    parts = codecs.encode(wq, sym, "x", mask, grid)
    assert sum(t.numel() * t.element_size() for k, t in parts.items() if k != "shape") / w.numel() == pytest.approx(0.25 + 0.125 + 2 / 128)


@pytest.mark.parametrize("settings,message", [
    (dict(pattern="2:4", quant="int4", group_size=2), "multiple of pattern 2:4's group width 4"),
    (dict(pattern="4x4:8", quant="int4", group_size=6), "multiple of pattern 4x4:8's group width 4"),
    (dict(method="gptq", pattern="2:4"), "give it a grid"),
    (dict(pattern="2:4", quant="int4", tune_epochs=1), "off the --quant grid"),
])
def test_impossible_combinations_fail_before_work(settings, message):
    with pytest.raises(LLMPruneError, match=message):
        config = PruneConfig(**settings)
        config.plan()
        llmprune.prune(tiny_model(), None, config, calib=CALIB, quiet=True)


def test_parse_quant_refuses_bad_specs():
    assert parse_quant("none") is None and str(parse_quant("int4", 128)) == "int4g128"
    with pytest.raises(LLMPruneError, match="unknown quantization"):
        parse_quant("int3")
    with pytest.raises(LLMPruneError, match="group size"):
        parse_quant("int4", 0)


@pytest.mark.parametrize("arch,settings", [
    ("llama", dict(method="admm", pattern="2:4", quant="int4", group_size=32)),
    ("llama", dict(method="gptq", pattern="unstructured", sparsity=0.0, quant="int8", sym=True, group_size=-1)),
    ("llama", dict(method="sparsegpt", pattern="4x4:8", quant="int4", group_size=16)),
    ("llama-bf16", dict(method="admm", pattern="unstructured", sparsity=0.5, quant="int4", group_size=64)),
    ("mixtral", dict(method="admm", pattern="2:4", quant="int4", group_size=32, batch_experts="on",
                     expert_min_tokens=1)),
])
def test_saved_checkpoint_verifies_and_loads_bit_exactly(tmp_path: Path, arch, settings):
    from benchmarks.coverage import tiny

    from transformers import AutoModelForCausalLM

    model = tiny(arch) if arch == "mixtral" else tiny_model().to(torch.bfloat16 if arch == "llama-bf16" else torch.float32)
    result = llmprune.prune(model, None, PruneConfig(batch_size=4, **settings), calib=CALIB, quiet=True)
    assert result.record["quant"]["bits"] in (4, 8) and len(result.grids) == len(result.patterns)
    out = result.save(tmp_path / "q")
    report = inspect(out)
    assert report["ok"] and all("+int" in r["pattern"] for r in report["layers"])
    ids = CALIB[:2]
    with torch.no_grad():
        loaded = llmprune.load(out)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        want = loaded(ids).logits
        if arch != "llama-bf16":  # (casting the model to bf16 cast its rotary buffer too; a loaded one computes it)
            assert torch.equal(model(ids).logits, want)
        if arch != "mixtral":  # the packed modules decode on the fly; plain transformers decodes the same weights
            assert torch.equal(llmprune.load(out, compressed_modules=True)(ids).logits, want)
            plain = AutoModelForCausalLM.from_pretrained(out)
            assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    ratio = report["totals"]["ratio"]
    assert ratio < (0.3 if settings.get("quant") == "int8" and settings.get("sparsity") == 0.0 else
                    0.3 if arch == "llama-bf16" else 0.15)  # bytes against the model's own dtype


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_int4_decode_kernel_matches_the_reference(sparse, symmetric, m):
    from llmprune.kernels.int4 import int4_mm, quantize, reference_mm

    g = torch.Generator().manual_seed(m)
    w = torch.randn(48, 576, generator=g)  # 576: a short last group of 64, and a partial BLOCK_K
    q = quantize(w, 128, sparse, symmetric)
    x = torch.randn(m, 576, generator=g).half()
    ref = reference_mm(x, q).float()
    assert torch.allclose(int4_mm(x, q).float(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    assert q.nbytes / w.numel() == pytest.approx((0.375 if sparse else 0.5) + 2 * 5 / 576 + (0 if symmetric else 5 / 576))


def test_int4_kernel_weight_from_a_checkpoint_is_the_saved_weight(tmp_path: Path):
    from llmprune.export import Checkpoint
    from llmprune.kernels.int4 import Int4Linear, from_parts

    model = tiny_model()
    result = llmprune.prune(model, None, PruneConfig(pattern="2:4", quant="int4", group_size=32, batch_size=4),
                            calib=CALIB, quiet=True)
    ckpt = Checkpoint(result.save(tmp_path / "q"))
    name = "model.layers.1.mlp.down_proj.weight"
    packed = from_parts(ckpt.parts(name), ckpt.targets[name])
    assert torch.equal(packed.dequantize(), model.get_submodule(name.removesuffix(".weight")).weight)
    x = torch.randn(3, 128)
    from llmprune.kernels import cpu

    rounded = cpu.quantize_act(x) if cpu.available() else x  # the CPU kernels multiply int8-rounded tokens
    assert torch.allclose(Int4Linear(packed)(x), torch.nn.functional.linear(rounded, packed.dequantize()), atol=1e-5)
    tiles = tiny_model()  # 4x4:8 + int4: the tile layout's codes, the same weight
    other = llmprune.prune(tiles, None, PruneConfig(pattern="4x4:8", quant="int4", group_size=32, batch_size=4),
                           calib=CALIB, quiet=True)
    c2 = Checkpoint(other.save(tmp_path / "t"))
    assert torch.equal(from_parts(c2.parts(name), c2.targets[name]).dequantize(),
                       tiles.get_submodule(name.removesuffix(".weight")).weight)
    with pytest.raises(ValueError, match="the int4 kernels run int4 weights"):
        eight = llmprune.prune(tiny_model(), None, PruneConfig(pattern="2:4", quant="int8", group_size=32,
                                                               batch_size=4), calib=CALIB, quiet=True)
        c3 = Checkpoint(eight.save(tmp_path / "e"))
        from_parts(c3.parts(name), c3.targets[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_int4_decode_kernel_on_cuda(dtype, sparse):
    from llmprune.kernels.int4 import Int4Linear, quantize, reference_mm

    w = torch.randn(4096, 4096, device="cuda") * 0.02
    q = quantize(w, 128, sparse)
    lin = Int4Linear(q)
    for m in (1, 4, 16, 64):  # 64: the dequantise-and-matmul path
        x = torch.randn(m, 4096, device="cuda", dtype=dtype)
        ref = reference_mm(x, q).float()
        assert torch.allclose(lin(x).float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_with_kernels_runs_a_2_4_int4_checkpoint(tmp_path: Path):
    from llmprune.kernels.int4 import Int4Linear

    model = tiny_model()
    result = llmprune.prune(model, None, PruneConfig(pattern="2:4", quant="int4", group_size=32, batch_size=4),
                            calib=CALIB, quiet=True)
    out = result.save(tmp_path / "q")
    fast = llmprune.load(out, dtype="float16", device="cuda", kernels=True)
    assert isinstance(fast.model.layers[0].mlp.down_proj, Int4Linear)
    ids = CALIB[:1].cuda()
    with torch.no_grad():
        want = llmprune.load(out, dtype="float16", device="cuda")(ids).logits.float()
        got = fast(ids).logits.float()
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
