"""Every method on one random layer with realistic inputs: contract, quality ordering, ADMM details."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmprune.methods import METHODS, LayerStats, dense_target, paired_error, reconstruction_error
from llmprune.methods.admm import ADMMConfig, admm_prune
from llmprune.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune
from llmprune.patterns import Pattern, count, parse_pattern

S = LayerStats.from_xtx  # both statistics from a Gram matrix: every method gets what it declares
PRUNERS = [n for n in METHODS if not METHODS[n].quantizes]  # gptq needs a grid: tests/test_quant.py

pytestmark = pytest.mark.usefixtures("one_thread")

Layer = tuple[torch.Tensor, torch.Tensor]  # weight, XᵀX

PATTERNS = {
    "row50": ("unstructured", 0.5, "row"),
    "row70": ("unstructured", 0.7, "row"),
    "layer60": ("unstructured", 0.6, "layer"),
    "2:4": ("2:4", None, "row"),
    "1:4": ("1:4", None, "row"),
    "4x4:8": ("4x4:8", None, "row"),
    "2x8:4": ("2x8:4", None, "row"),
}


def _layer(out_f: int = 64, in_f: int = 128, tokens: int = 2048, seed: int = 0) -> Layer:
    """A weight and ``XᵀX`` of correlated, full-rank inputs with a few outlier features."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))
    spectrum = torch.arange(1, in_f + 1, dtype=torch.float32) ** -0.6  # power law, like real activations
    x = (torch.randn(tokens, in_f, generator=g) * spectrum) @ q.T
    x = x * torch.exp(0.5 * torch.randn(in_f, generator=g))
    x[:, torch.randperm(in_f, generator=g)[:4]] *= 20
    w = torch.randn(out_f, in_f, generator=g) * torch.exp(0.3 * torch.randn(out_f, 1, generator=g))
    return w, x.T @ x




@pytest.fixture(scope="module")
def layer() -> Layer:
    return _layer()


def _pattern(key: str) -> Pattern:
    return parse_pattern(*PATTERNS[key])


def _run(name: str, layer: Layer, pattern: Pattern, config: object | None = None) -> torch.Tensor:
    w, xtx = layer
    method = METHODS[name]
    result = method.fn(w.clone(), S(xtx), pattern, config or method.default_config())
    return result.weight


def _pruned(p: Pattern, shape: torch.Size) -> int:
    """How many weights the pattern removes in total."""
    if p.kind == "unstructured" and p.granularity == "row":
        return shape[0] * count(p.sparsity, shape[1])
    return count(p.sparsity, shape[0] * shape[1])


def _err(layer: Layer, w1: torch.Tensor, damped: bool = False) -> float:
    w, xtx = layer
    # ADMM's own objective: 0.1 · mean diagonal in the normalised space is 10% of each feature's diagonal.
    h = xtx + 0.1 * torch.diag(torch.diag(xtx)) if damped else xtx
    return reconstruction_error(w, w1, h)


@pytest.mark.parametrize("key", list(PATTERNS))
@pytest.mark.parametrize("name", PRUNERS)
def test_exact_sparsity_and_no_violations(name: str, key: str, layer: Layer) -> None:
    w, xtx = layer
    p = _pattern(key)
    method = METHODS[name]
    res = method.fn(w.clone(), S(xtx), p, method.default_config())
    assert res.weight.shape == w.shape and res.weight.dtype == torch.float32
    assert res.mask.dtype == torch.bool and res.mask.shape == w.shape
    assert torch.isfinite(res.weight).all()
    assert not res.weight[~res.mask].any(), "weights outside the mask must be exactly zero"
    assert p.violations(res.weight) == 0 and p.violations(res.mask.float()) == 0
    # No group over its budget and the total exact means every group is exact.
    assert int((~res.mask).sum()) == _pruned(p, w.shape)
    assert int((res.weight == 0).sum()) == _pruned(p, w.shape)


@pytest.mark.parametrize("key", ["row50", "layer60", "2:4", "4x4:8"])
def test_reconstruction_error_ordering(key: str, layer: Layer) -> None:
    p = _pattern(key)
    err = {name: _err(layer, _run(name, layer, p)) for name in PRUNERS}
    assert err["wanda"] <= err["magnitude"] * 1.05
    assert err["sparsegpt"] < err["wanda"]
    assert err["admm"] < err["sparsegpt"]


@pytest.mark.parametrize("name", [n for n in PRUNERS if METHODS[n].stats])
def test_sparsity_zero_returns_weight_unchanged(name: str, layer: Layer) -> None:
    w, _ = layer
    p = parse_pattern("unstructured", 0.0)
    assert torch.equal(_run(name, layer, p), w)


def test_admm_error_does_not_rise_once_mask_is_frozen(layer: Layer) -> None:
    p = _pattern("2:4")
    paper = ADMMConfig.paper()
    after_ramp = [paper.ramp_steps + k for k in range(0, 10, 2)]
    admm = [_err(layer, _run("admm", layer, p, replace(paper, iters=it)), True) for it in after_ramp]
    cg = [_err(layer, _run("admm", layer, p, ADMMConfig(final_cg_iters=k)), True) for k in range(0, 10, 2)]
    for seq in (admm, cg):
        assert all(b <= a * (1 + 1e-4) for a, b in zip(seq, seq[1:])), seq
        assert seq[-1] < seq[0]


@pytest.mark.parametrize(
    ("improvement", "patterns"),
    [
        ({"final_cg_iters": 10}, ["row50", "layer60", "2:4", "4x4:8"]),
        ({"rho_start": 0.05, "rho_updates": 6}, ["layer60", "2:4", "4x4:8"]),
        ({"iters": 40, "ramp_steps": 30}, ["layer60", "2:4", "4x4:8"]),
    ],
)
def test_each_admm_improvement_beats_the_paper(
    improvement: dict, patterns: list[str], layer: Layer
) -> None:
    paper = ADMMConfig.paper()
    for key in patterns:
        p = _pattern(key)
        base = _err(layer, _run("admm", layer, p, paper))
        assert _err(layer, _run("admm", layer, p, replace(paper, **improvement))) < base, key


@pytest.mark.parametrize("key", ["row50", "layer60", "2:4", "4x4:8"])
def test_admm_defaults_beat_the_paper(key: str, layer: Layer) -> None:
    p = _pattern(key)
    assert _err(layer, _run("admm", layer, p)) < _err(layer, _run("admm", layer, p, ADMMConfig.paper()))


def test_admm_paper_config_is_reachable() -> None:
    paper = ADMMConfig.paper()
    assert (paper.iters, paper.ramp_steps, paper.rho, paper.percdamp, paper.final_cg_iters) == (20, 15, 1.0, 0.1, 0)
    assert paper.rho_start == paper.rho  # constant ρ


@pytest.mark.parametrize("config", [ADMMConfig(iters=5, ramp_steps=15), ADMMConfig(iters=0), ADMMConfig(ramp_steps=0)])
def test_admm_odd_schedules_still_reach_the_pattern(config: ADMMConfig, layer: Layer) -> None:
    w, xtx = layer
    p = _pattern("2:4")
    res = admm_prune(w.clone(), S(xtx), p, config)
    assert p.violations(res.weight) == 0 and int((~res.mask).sum()) == _pruned(p, w.shape)


@pytest.mark.parametrize("blocksize", [1, 5, 6, 128, 1000])
@pytest.mark.parametrize("key", ["row70", "layer60", "2:4", "2x8:4"])
def test_sparsegpt_any_blocksize_is_exact(blocksize: int, key: str, layer: Layer) -> None:
    w, xtx = layer
    p = _pattern(key)
    res = sparsegpt_prune(w.clone(), S(xtx), p, SparseGPTConfig(blocksize=blocksize))
    assert p.violations(res.weight) == 0 and int((~res.mask).sum()) == _pruned(p, w.shape)


@pytest.mark.parametrize("name", ["admm", "sparsegpt"])
def test_dead_input_features(name: str, layer: Layer) -> None:
    w, xtx = layer
    xtx = xtx.clone()
    xtx[:3] = 0  # features never active during calibration
    xtx[:, :3] = 0
    p = _pattern("2:4")
    out = METHODS[name].fn(w.clone(), S(xtx), p, METHODS[name].default_config()).weight
    assert torch.isfinite(out).all() and p.violations(out) == 0
    assert _err((w, xtx), out) < _err((w, xtx), _run("wanda", (w, xtx), p))


@pytest.mark.parametrize("name", ["admm", "sparsegpt"])
def test_non_finite_result_raises(name: str, layer: Layer) -> None:
    w, xtx = layer
    w = w.clone()
    w[3, 5] = float("nan")
    with pytest.raises(FloatingPointError):
        METHODS[name].fn(w, S(xtx), _pattern("row50"), METHODS[name].default_config())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["admm", "sparsegpt"])
def test_cuda_matches_cpu(name: str, layer: Layer) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    w, xtx = layer
    p = _pattern("2:4")
    cfg = METHODS[name].default_config()
    cpu = METHODS[name].fn(w.clone(), S(xtx), p, cfg)
    gpu = METHODS[name].fn(w.cuda(), S(xtx.cuda()), p, cfg)
    assert gpu.weight.is_cuda and p.violations(gpu.weight.cpu()) == 0
    assert abs(_err(layer, gpu.weight.cpu()) - _err(layer, cpu.weight)) < 0.05 * _err(layer, cpu.weight)


def _paired_inputs(in_f: int = 128, tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense-model inputs and the same tokens after upstream pruning: a correlated distortion plus noise."""
    g = torch.Generator().manual_seed(1)
    xd = torch.randn(tokens, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g) / in_f**0.5)
    xp = xd @ (torch.eye(in_f) + 0.2 * torch.randn(in_f, in_f, generator=g) / in_f**0.5) + 0.1 * torch.randn(tokens, in_f, generator=g)
    return xd, xp


def test_paired_error_matches_its_definition() -> None:
    xd, xp = _paired_inputs()
    w0 = torch.randn(32, 128)
    w1 = w0 * (torch.rand_like(w0) > 0.5)
    direct = (xp @ w1.T - xd @ w0.T).square().sum() / (xd @ w0.T).square().sum()
    got = paired_error(w0, w1, xp.T @ xp, xp.T @ xd, float((xd @ w0.T).square().sum()))
    assert got == pytest.approx(float(direct), rel=1e-3)


def test_dense_target_is_the_weight_itself_for_identical_inputs(layer: Layer) -> None:
    w, xtx = layer
    assert torch.equal(dense_target(w, xtx, xtx.clone(), 0.1), w)


@pytest.mark.parametrize("name", ["admm", "sparsegpt"])
@pytest.mark.parametrize("key", ["row50", "2:4"])
def test_pruning_the_dense_target_fits_the_dense_outputs_better(name: str, key: str) -> None:
    xd, xp = _paired_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    xtx, xtd, dense_sq = xp.T @ xp, xp.T @ xd, float((xd @ w.T).square().sum())
    method = METHODS[name]
    config = method.default_config()
    plain = method.fn(w.clone(), S(xtx), _pattern(key), config).weight
    fitted = method.fn(dense_target(w, xtx, xtd, config.percdamp), S(xtx), _pattern(key), config).weight
    assert paired_error(w, fitted, xtx, xtd, dense_sq) < 0.9 * paired_error(w, plain, xtx, xtd, dense_sq)
