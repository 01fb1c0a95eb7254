"""The streaming engine on tiny random models of real architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import llmprune
from llmprune import LLMPruneError, PruneConfig
from llmprune.engine import StatsCollector, capture_inputs
from llmprune.engine.block import run_block
from llmprune.models import find_blocks
from llmprune.targets import find_targets
from llmprune.patterns import count, parse_pattern

from .conftest import tiny_model

CALIB = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(0))
METHODS = ["admm", "sparsegpt", "wanda", "magnitude"]
PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None), ("4x4:8", None)]


def _prune(model, **kw) -> dict:
    kw.setdefault("batch_size", 4)  # 6 windows -> batches of 4 and 2: both kwarg shapes are exercised
    return llmprune.prune(model, None, PruneConfig(**kw), calib=CALIB, quiet=True).record


def _methods() -> list[str]:
    from llmprune.methods import METHODS as registry

    return [m for m in METHODS if m in registry]


@pytest.mark.parametrize("method", _methods())
@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
def test_exact_sparsity_in_every_linear(method, pattern, sparsity):
    model = tiny_model()
    dense = copy.deepcopy(model)
    record = _prune(model, method=method, pattern=pattern, sparsity=sparsity)
    pat = parse_pattern(pattern, sparsity)
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, lin in find_targets(block, f"{prefix}.{i}").items():
            if pat.structured:
                assert int((lin.weight == 0).sum()) == count(pat.sparsity, lin.weight.numel()), name
            else:  # exact integer count in every comparison group (row)
                assert ((lin.weight == 0).sum(1) == count(pat.sparsity, lin.weight.shape[1])).all(), name
            assert pat.violations(lin.weight) == 0, name
    assert len(record["layers"]) == 2 * 7
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)


@pytest.mark.parametrize("method", _methods())
def test_sparsity_zero_keeps_logits(method):
    model = tiny_model()
    with torch.no_grad():
        ref = model(CALIB).logits
    _prune(model, method=method, sparsity=0.0)
    with torch.no_grad():
        assert torch.equal(model(CALIB).logits, ref)


def test_admm_beats_wanda_and_magnitude_in_the_engine():
    errs = {}
    for method in ("admm", "wanda", "magnitude"):
        record = _prune(tiny_model(), method=method, pattern="2:4")
        errs[method] = sum(layer["recon_error"] for layer in record["layers"])
    assert errs["admm"] < errs["wanda"] < errs["magnitude"] * 1.05


def test_skip_leaves_layers_dense():
    model = tiny_model()
    dense = copy.deepcopy(model)
    record = _prune(model, method="wanda", skip=["*.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
    names = {layer["name"] for layer in record["layers"]}
    assert "model.layers.1.mlp.down_proj" not in names and "model.layers.0.self_attn.q_proj" not in names
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, dense.model.layers[1].mlp.down_proj.weight)
    assert (model.model.layers[0].self_attn.k_proj.weight == 0).any()


def test_offload_activations_gives_the_same_model():
    a, b = tiny_model(), tiny_model()
    _prune(a, method="admm", pattern="2:4")
    _prune(b, method="admm", pattern="2:4", offload_activations=True)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_shared_inputs_share_one_xtx():
    model = tiny_model()
    _, blocks = find_blocks(model)
    acts = capture_inputs(model, blocks, CALIB, 4, torch.device("cpu"), torch.device("cpu"))
    collector = StatsCollector(find_targets(blocks[0], "b"), torch.device("cpu"), ("xtx", "input_sq"))
    run_block(blocks[0], acts, torch.device("cpu"), replace=False, collector=collector)
    collector.remove()
    groups = [sorted(n.rsplit(".", 1)[-1] for n in g) for g in collector.groups()]
    assert groups == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    # the shared statistics are the exact XᵀX of the block's normalised input
    x = torch.cat([blocks[0].input_layernorm(h) for h in acts.batches]).reshape(-1, 64)
    stats = collector.get("b.self_attn.k_proj")
    torch.testing.assert_close(stats.xtx, x.T @ x, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.input_sq, x.square().sum(0), rtol=1e-4, atol=1e-3)  # O(d): Wanda's, OWL's


def test_each_method_collects_only_what_it_declares(monkeypatch):
    """Wanda gets the O(d) input norms and never a d x d Gram; magnitude gets nothing."""
    seen = {}
    real = StatsCollector.__init__

    def spy(self, linears, device, wants, *a, **kw):
        seen.setdefault(tuple(sorted(wants)), 0)
        real(self, linears, device, wants, *a, **kw)

    monkeypatch.setattr(StatsCollector, "__init__", spy)
    for method in ("wanda", "magnitude", "admm"):
        seen.clear()
        record = _prune(tiny_model(), method=method, pattern="2:4")
        assert list(seen) == [{"wanda": ("input_sq",), "magnitude": (), "admm": ("xtx",)}[method]]
        errs = [r["recon_error"] for r in record["layers"]]
        assert all(0 < e < 1 for e in errs), (method, errs)  # exact errors all the same (ErrorMeter without XᵀX)


def test_gpt2_conv1d_is_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(LLMPruneError, match="Conv1D"):
        _prune(model, method="magnitude")


def test_unknown_layout_names_what_was_looked_for():
    class NotAnLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LLMPruneError, match="ModuleList"):
        _prune(NotAnLM(), method="magnitude")


def test_tile_pattern_on_indivisible_shape_is_refused_before_work():
    model = tiny_model(intermediate_size=130)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LLMPruneError, match="not divisible"):
        _prune(model, method="admm", pattern="4x4:8")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sequential_prunes_later_groups_from_pruned_inputs():
    plain, seq = tiny_model(), tiny_model()
    _prune(plain, method="admm", pattern="2:4")
    record = _prune(seq, method="admm", pattern="2:4", sequential=True)
    assert record["sparsity"] == pytest.approx(0.5)
    first, later = seq.model.layers[0].self_attn, seq.model.layers[0]
    # q/k/v see the block input either way; o_proj and the MLP see the pruned attention's outputs
    assert torch.equal(first.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(later.self_attn.o_proj.weight, plain.model.layers[0].self_attn.o_proj.weight)
    assert not torch.equal(later.mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)
    assert parse_pattern("2:4").violations(later.mlp.down_proj.weight) == 0


def _logit_error(model, dense) -> float:
    with torch.no_grad():
        ref, out = dense(CALIB).logits, model(CALIB).logits
    return float((out - ref).square().sum() / ref.square().sum())


@pytest.mark.parametrize("method", ["admm", "sparsegpt"])
def test_dense_targets_bring_the_pruned_model_closer_to_the_dense_one(method):
    dense = tiny_model()
    models, errors = {}, {}
    for variant in [(), ("sequential",), ("dense_targets",), ("dense_targets", "sequential")]:
        models[variant] = model = copy.deepcopy(dense)
        record = _prune(model, method=method, pattern="2:4", **dict.fromkeys(variant, True))
        assert record["sparsity"] == pytest.approx(0.5)
        assert all(parse_pattern("2:4").violations(lin.weight) == 0 for lin in find_targets(model.model.layers, "m").values())
        errors[variant] = _logit_error(model, dense)
    # block 0 sees identical inputs in both streams, so its q/k/v are pruned exactly as without targets
    q = [models[v].model.layers[0].self_attn.q_proj.weight for v in [(), ("dense_targets",)]]
    assert torch.equal(*q)
    # dense targets imply the sequential order
    same = [models[v].state_dict() for v in [("dense_targets",), ("dense_targets", "sequential")]]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
    assert errors[("dense_targets",)] < 0.5 * min(errors[()], errors[("sequential",)])


def test_dense_targets_need_a_weight_update():
    with pytest.raises(LLMPruneError, match="needs a method that updates weights"):
        _prune(tiny_model(), method="wanda", pattern="2:4", dense_targets=True)


def test_owl_allocation_gives_outlier_blocks_more_weights():
    model = tiny_model(num_hidden_layers=4)
    with torch.no_grad():  # block 2 gets a few huge weights: the most outliers, so the lowest sparsity
        model.model.layers[2].mlp.up_proj.weight[:, :3] *= 40
    record = _prune(model, method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.1)
    alloc = record["allocation"]
    assert max(range(4), key=lambda i: alloc["outlier_ratios"][i]) == 2
    assert min(range(4), key=lambda i: alloc["sparsity"][i]) == 2
    assert sum(alloc["sparsity"]) / 4 == pytest.approx(0.6) and max(alloc["sparsity"]) - min(alloc["sparsity"]) == pytest.approx(0.2)
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):  # every row of every Linear holds exactly its block's sparsity
        for name, lin in find_targets(block, f"{prefix}.{i}").items():
            assert ((lin.weight == 0).sum(1) == count(alloc["sparsity"][i], lin.weight.shape[1])).all(), name
    assert record["sparsity"] == pytest.approx(0.6, abs=1 / 64)
    assert {r["target"] for r in record["layers"]} == set(alloc["sparsity"])


def test_owl_with_zero_lambda_equals_uniform():
    uniform, owl = tiny_model(), tiny_model()
    _prune(uniform, method="admm", sparsity=0.6)
    _prune(owl, method="admm", sparsity=0.6, allocation="owl", owl_lambda=0.0)
    assert all(torch.equal(a, b) for a, b in zip(uniform.state_dict().values(), owl.state_dict().values()))


def test_owl_needs_unstructured_sparsity():
    with pytest.raises(LLMPruneError, match="needs unstructured sparsity"):
        _prune(tiny_model(), method="wanda", pattern="2:4", allocation="owl")


@pytest.mark.parametrize("extra", [{}, dict(dense_targets=True)])
def test_block_tuning_lowers_the_error_and_keeps_the_masks(extra):
    dense, plain, tuned = tiny_model(), tiny_model(), tiny_model()
    _prune(plain, method="admm", pattern="2:4", **extra)
    record = _prune(tuned, method="admm", pattern="2:4", tune_epochs=10, tune_lr=1e-3, **extra)
    assert len(record["tune"]) == 2 and all(b["after"] < 0.5 * b["before"] for b in record["tune"])
    # block 0 keeps exactly the zeros it was pruned to (block 1 sees tuned inputs, so its masks may differ)
    for name, lin in find_targets(tuned.model.layers[0], "b").items():
        assert torch.equal(lin.weight == 0, find_targets(plain.model.layers[0], "b")[name].weight == 0), name
    assert all(parse_pattern("2:4").violations(lin.weight) == 0 for lin in find_targets(tuned.model.layers, "m").values())
    assert _logit_error(tuned, dense) < 0.5 * _logit_error(plain, dense)


def test_block_tuning_in_bfloat16_keeps_the_dtype():
    model = tiny_model().to(torch.bfloat16)
    record = _prune(model, method="wanda", pattern="2:4", tune_epochs=2, tune_lr=1e-3)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b["after"] <= b["before"] for b in record["tune"])
    assert all(parse_pattern("2:4").violations(lin.weight) == 0 for lin in find_targets(model.model.layers, "m").values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_engine_on_each_device(device):
    """The same run on the GPU (blocks visit it one at a time) as on the CPU: exact pattern, weights back home,
    layer errors within a few percent (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = _prune(tiny_model(), method="admm", pattern="2:4", device="cpu")
    model = tiny_model()
    record = _prune(model, method="admm", pattern="2:4", device=device)
    assert record["device"].startswith(device) and record["sparsity"] == pytest.approx(0.5)
    assert all(p.device.type == "cpu" for p in model.parameters())
    for a, b in zip(record["layers"], ref["layers"]):
        assert a["recon_error"] == pytest.approx(b["recon_error"], rel=0.05, abs=1e-4), a["name"]
