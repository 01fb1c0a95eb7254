"""One table-driven test over tiny random models of the 2026 decoder zoo, dense and mixture-of-experts.

For each: the exact pattern holds in every target (every expert of fused 3-D experts included), the
targets cover >= 95 % of the block weights or the rest is listed as ``not_pruned``, sparsity 0 leaves the
logits as they were, the routed expert loop llmprune watches equals the model's own forward, save -> load
gives the same logits, and pruning from disk gives the same weights as pruning in memory.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmprune
from llmprune import LLMPruneError, PruneConfig, prune_checkpoint
from transformers import AutoModelForCausalLM

from llmprune.export import save_pruned
from llmprune.export.inspection import inspect
from llmprune.models import find_blocks
from llmprune.patterns import parse_pattern
from llmprune.targets import find_targets, fused_experts, watch

CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(0))
_spec = importlib.util.spec_from_file_location("bench_coverage", Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py")
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)
ARCHS = [a for a in coverage.ARCHS if a != "gpt2"]  # the configs the README's coverage table is measured on
EXPERTS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"}


def _model(arch: str):
    return coverage.tiny(arch)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(CALIB).logits


def _config(**kw) -> PruneConfig:
    return PruneConfig(**{"method": "admm", "pattern": "2:4", "batch_size": 2, **kw})


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture(arch, tmp_path):
    model = _model(arch)
    dense = _logits(model)
    prefix, blocks = find_blocks(model)
    targets = {n: t for i, b in enumerate(blocks) for n, t in find_targets(b, f"{prefix}.{i}").items()}
    assert any(t.expert is not None for t in targets.values()) == (arch in EXPERTS)

    # the routed loop that feeds the experts' statistics computes what the model computes
    remove = watch(targets, lambda name, x: None)
    try:
        torch.testing.assert_close(_logits(model), dense, rtol=1e-5, atol=1e-5)
    finally:
        remove()

    untouched = copy.deepcopy(model)
    llmprune.prune(untouched, None, _config(method="magnitude", pattern="unstructured", sparsity=0.0), calib=CALIB,
                   quiet=True)
    assert torch.equal(_logits(untouched), dense)

    result = llmprune.prune(model, None, _config(), calib=CALIB, quiet=True)
    record = result.record
    pattern = parse_pattern("2:4")
    for t in targets.values():
        assert pattern.violations(t.weight) == 0, t.name
        assert int((t.weight == 0).sum()) >= t.weight.numel() // 2, t.name
    covered = sum(t.weight.numel() for t in targets.values())
    weights = sum(p.numel() for b in blocks for p in b.parameters() if p.dim() >= 2)
    listed = sum(torch.Size(d["shape"]).numel() for d in record["not_pruned"])
    assert covered >= 0.95 * weights or covered + listed >= weights, (covered / weights, record["not_pruned"])
    assert record["targets"] == len(targets) == len(record["layers"])
    assert record["sparsity_block_weights"] > 0.4
    if arch in EXPERTS:
        e = record["experts"]
        assert e["targets"] == sum(t.expert is not None for t in targets.values())
        assert sum(r["tokens"] for r in record["layers"] if r["name"].endswith("gate_up_proj[0]") or
                   r["name"].endswith("up_proj[0]")) > 0
    pruned = _logits(model)

    result.save(tmp_path / "c", "compressed")
    assert torch.equal(_logits(llmprune.load(tmp_path / "c")), pruned)
    assert inspect(tmp_path / "c")["ok"]
    if arch in EXPERTS:  # plain from_pretrained decodes compressed Linears, not compressed experts: it says so
        with pytest.raises(LLMPruneError, match="compressed fused MoE experts"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    else:
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "c")), pruned)

    result.save(tmp_path / "d", "dense")  # plain transformers reads the dense format, experts included
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "d")), pruned)

    # from disk: transformers saves most MoE experts one by one, as the hub has them, and the stream fuses them
    # block by block with transformers' own conversion mapping; llmprune's fused dense save streams as is
    for name, save in (("hub", lambda d: _model(arch).save_pretrained(d)),
                       ("fused", lambda d: save_pruned(_model(arch), None, d, "dense"))):
        save(tmp_path / name)
        prune_checkpoint(tmp_path / name, tmp_path / f"s-{name}", _config(), calib=CALIB, quiet=True)
        got, want = llmprune.load(tmp_path / f"s-{name}").state_dict(), model.state_dict()
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], name


def test_expert_orientation_is_the_declared_one():
    """gpt-oss stores experts input-first ([E, H, 2I]); Mixtral output-first ([E, 2I, H]). Either way a
    target is [out, in], so N:M groups run along the input."""
    for arch, transposed in (("gpt_oss", True), ("mixtral", False)):
        model = _model(arch)
        prefix, blocks = find_blocks(model)
        targets = find_targets(blocks[0], f"{prefix}.0")
        fused = fused_experts(blocks[0], f"{prefix}.0")
        assert {t for _, t in fused.values()} == {transposed}
        t = targets[f"{prefix}.0.mlp.experts.gate_up_proj[1]"]
        stored = t.module.gate_up_proj[1]
        x = torch.randn(5, model.config.hidden_size)
        y = x @ stored if transposed else F.linear(x, stored)
        torch.testing.assert_close(F.linear(x, t.weight), y)
        assert t.weight.shape[1] == model.config.hidden_size  # the input dimension


def test_expert_without_tokens_falls_back_to_magnitude():
    model = _model("gpt_oss")
    with torch.no_grad():  # a router that never picks expert 3
        for block in model.model.layers:
            block.mlp.router.bias[3] = -1e4
    record = llmprune.prune(model, None, _config(expert_min_tokens=1), calib=CALIB, quiet=True).record
    starved = [r for r in record["layers"] if r["name"].endswith("[3]")]
    assert starved and all(r["tokens"] == 0 and r["method"] == "magnitude" for r in starved)
    assert all(r["method"] == "admm" and r["tokens"] > 0 for r in record["layers"] if not r["name"].endswith("[3]"))
    assert record["experts"]["no_tokens"] == len(starved) == record["experts"]["magnitude_fallback"]
    w = model.model.layers[0].mlp.experts.down_proj[3].T  # gpt-oss stores [in, out]
    assert parse_pattern("2:4").violations(w) == 0 and (w == 0).any()


@pytest.mark.parametrize("extra", [dict(sequential=True), dict(dense_targets=True), dict(tune_epochs=1),
                                   dict(method="wanda"), dict(method="sparsegpt", pattern="4x4:8"),
                                   dict(method="admm", pattern="unstructured", sparsity=0.6, allocation="owl")])
def test_experts_through_every_option(extra):
    model = _model("qwen3_moe")
    record = llmprune.prune(model, None, _config(**extra), calib=CALIB, quiet=True).record
    pattern = parse_pattern(extra.get("pattern", "2:4"), extra.get("sparsity"))
    prefix, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        for t in find_targets(b, f"{prefix}.{i}").values():
            p = pattern if "allocation" not in extra else \
                parse_pattern("unstructured", record["allocation"]["sparsity"][i])
            assert p.violations(t.weight) == 0, t.name
    assert all(r["recon_error"] == r["recon_error"] for r in record["layers"] if r["tokens"] > 0)  # not NaN


def test_strict_refuses_what_stays_dense_and_skip_is_listed():
    model = _model("mixtral")
    record = llmprune.prune(model, None, _config(skip=["*.experts.down_proj"]), calib=CALIB, quiet=True).record
    listed = {d["name"]: d["reason"] for d in record["not_pruned"]}
    assert listed == {f"model.layers.{i}.mlp.experts.down_proj": "skip" for i in range(2)}
    assert record["sparsity_block_weights"] < record["sparsity"]
    llmprune.prune(_model("mixtral"), None, _config(skip=["*.experts.down_proj"], strict=True), calib=CALIB, quiet=True)


def test_gpt2_conv1d_is_refused_in_one_line():
    with pytest.raises(LLMPruneError, match="Conv1D"):
        llmprune.prune(coverage.tiny("gpt2"), None, _config(), calib=CALIB, quiet=True)


@pytest.mark.parametrize("extra", [{}, dict(sequential=True), dict(pattern="4x4:8")])
def test_batched_experts_equal_one_by_one(extra):
    a, b = _model("qwen3_moe"), _model("qwen3_moe")
    ra = llmprune.prune(a, None, _config(batch_experts="on", **extra), calib=CALIB, quiet=True).record
    rb = llmprune.prune(b, None, _config(batch_experts="off", **extra), calib=CALIB, quiet=True).record
    assert [k for (k, pa), pb in zip(a.named_parameters(), b.parameters()) if not torch.equal(pa, pb)] == []
    assert [r["recon_error"] for r in ra["layers"]] == pytest.approx([r["recon_error"] for r in rb["layers"]], rel=1e-5)


def test_moe_run_resumes_bit_identical(tmp_path, monkeypatch):
    from llmprune.engine import InPlaceBlocks

    work = str(tmp_path / "work")
    real = InPlaceBlocks.release

    def release(self, i):  # dies right after block 0 is committed
        real(self, i)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(InPlaceBlocks, "release", release)
        with pytest.raises(KeyboardInterrupt):
            llmprune.prune(_model("gpt_oss"), None, _config(work_dir=work), calib=CALIB, quiet=True)
    resumed, ref = _model("gpt_oss"), _model("gpt_oss")
    result = llmprune.prune(resumed, None, _config(work_dir=work, resume=True), calib=CALIB, quiet=True)
    want = llmprune.prune(ref, None, _config(), calib=CALIB, quiet=True)
    assert result.record["resumed_from"] == 1
    assert result.masks.keys() == want.masks.keys()
    assert all(torch.equal(result.masks[k].unpack(), want.masks[k].unpack()) for k in want.masks)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), ref.state_dict().values()))


def test_kernel_packer_takes_each_expert_as_a_matrix():
    from llmprune.kernels.formats import layout_for, pack, unpack

    model = _model("mixtral")
    result = llmprune.prune(model, None, _config(pattern="4x4:8"), calib=CALIB, quiet=True)
    prefix, blocks = find_blocks(model)
    for name, t in find_targets(blocks[0], f"{prefix}.0").items():
        if t.expert is not None:
            packed = pack(t.weight.detach().contiguous(), layout_for(result.patterns[t.key]), result.masks[t.key].unpack())
            assert torch.equal(unpack(packed), t.weight), name


@pytest.mark.parametrize("arch,mode", [("gpt_oss", "masked"), ("qwen3_moe", "admm"), ("mixtral", "sr-ste")])
def test_fine_tuning_keeps_every_expert_on_its_pattern(arch, mode, tmp_path):
    model = _model(arch)
    pruned = llmprune.prune(model, None, _config(), calib=CALIB, quiet=True)
    windows = torch.randint(0, 96, (24, 32), generator=torch.Generator().manual_seed(1))
    cfg = llmprune.FinetuneConfig(mode=mode, tokens=8 * 4 * 32, seqlen=32, batch_size=4, lr=3e-3, eval_every=4,
                                  val_fraction=0.2, device="cpu")
    before = {k: m.unpack() for k, m in pruned.masks.items()}
    out = llmprune.finetune(model, None, cfg, pruned.patterns, pruned.masks, windows=windows, quiet=True)
    assert out.masks.keys() == pruned.masks.keys()
    if mode == "masked":  # the pruner's masks, expert by expert, never change
        assert all(torch.equal(out.masks[k].unpack(), before[k]) for k in before)
    prefix, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        for t in find_targets(b, f"{prefix}.{i}").values():
            assert parse_pattern("2:4").violations(t.weight) == 0, t.name
            assert not t.weight[~out.masks[t.key].unpack()].any(), t.name
    out.save(tmp_path / "ft")
    assert inspect(tmp_path / "ft")["ok"]
