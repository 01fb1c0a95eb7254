"""Property tests of the pattern projection: exact counts per group, top scores kept, relaxation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmprune.errors import LLMPruneError
from llmprune.patterns import Pattern, count, parse_pattern

settings.register_profile("fast", max_examples=60, deadline=None)
settings.load_profile("fast")


def _scores(out_f: int, in_f: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: the projection must still keep exact counts
        return torch.randint(0, 4, (out_f, in_f), generator=g).float()
    return torch.randn(out_f, in_f, generator=g)


def _groups(x: torch.Tensor, p: Pattern) -> torch.Tensor:
    """``x`` reshaped to ``[groups, group_size]`` along the pattern's groups."""
    out_f, in_f = x.shape
    if p.kind == "nm":
        return x.reshape(-1, p.m)
    if p.kind == "tile":
        return x.reshape(out_f // p.r, p.r, in_f // p.c, p.c).permute(0, 2, 1, 3).reshape(-1, p.r * p.c)
    return x if p.granularity == "row" else x.reshape(1, -1)


def _assert_top_kept(scores: torch.Tensor, keep: torch.Tensor) -> None:
    """Within every group (row of the inputs) each kept score is ≥ each dropped one."""
    lo = scores.masked_fill(~keep, float("inf")).min(1).values
    hi = scores.masked_fill(keep, float("-inf")).max(1).values
    assert bool((lo >= hi).all())


@st.composite
def pattern_and_shape(draw: st.DrawFn, structured_only: bool = False) -> tuple[Pattern, int, int]:
    kind = draw(st.sampled_from(["nm", "tile"] if structured_only else ["row", "layer", "nm", "tile"]))
    if kind in ("row", "layer"):
        sparsity = draw(st.floats(0.0, 0.95))
        p = parse_pattern("unstructured", sparsity, kind)
        return p, draw(st.integers(1, 9)), draw(st.integers(1, 40))
    if kind == "nm":
        m = draw(st.sampled_from([2, 4, 8, 16]))
        p = parse_pattern(f"{draw(st.integers(1, m))}:{m}")
        return p, draw(st.integers(1, 9)), m * draw(st.integers(1, 6))
    r, c = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    p = parse_pattern(f"{r}x{c}:{draw(st.integers(1, r * c))}")
    return p, r * draw(st.integers(1, 5)), c * draw(st.integers(1, 5))


def _kept_per_group(p: Pattern, out_f: int, in_f: int) -> int:
    if p.kind == "nm":
        return p.n
    if p.kind == "tile":
        return p.k
    if p.granularity == "row":
        return in_f - count(p.sparsity, in_f)
    return out_f * in_f - count(p.sparsity, out_f * in_f)


@given(pattern_and_shape(), st.integers(0, 2**31 - 1), st.booleans())
def test_projection_keeps_exact_counts_and_top_scores(case: tuple[Pattern, int, int], seed: int, ties: bool) -> None:
    p, out_f, in_f = case
    p.check_shape((out_f, in_f))
    scores = _scores(out_f, in_f, seed, ties)
    keep = p.project(scores)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert bool((_groups(keep, p).sum(1) == _kept_per_group(p, out_f, in_f)).all())
    _assert_top_kept(_groups(scores, p), _groups(keep, p))
    assert p.violations(scores * keep + keep) == 0  # "+ keep": no kept weight is accidentally zero


@given(pattern_and_shape(structured_only=True), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_relaxation_contains_structured_mask_at_exact_density(
    case: tuple[Pattern, int, int], seed: int, frac: float
) -> None:
    p, out_f, in_f = case
    scores = _scores(out_f, in_f, seed, ties=False)
    target = frac * p.sparsity * 0.999  # strictly below the pattern's sparsity
    full = p.project(scores)
    relaxed = p.project(scores, target)
    numel = out_f * in_f
    assert bool((relaxed | ~full).all()), "relaxed mask must contain the structured one"
    assert int(relaxed.sum()) == numel - count(target, numel)
    # The additions are the best of what the structured mask dropped.
    rest = scores.masked_fill(full, float("nan")).flatten()
    added = (relaxed & ~full).flatten()
    dropped = ~relaxed.flatten()
    if added.any() and dropped.any():
        assert float(rest[added].min()) >= float(rest[dropped].max())


def test_unstructured_ramp_is_gradual() -> None:
    p = parse_pattern("unstructured", 0.6, "layer")
    scores = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    densities = [int(p.project(scores, s).sum()) for s in (0.0, 0.2, 0.4, 0.6)]
    assert densities == [512 - count(s, 512) for s in (0.0, 0.2, 0.4, 0.6)]


def test_count_is_robust_to_float_error() -> None:
    assert count(0.7, 10) == 7 and count(0.3, 10) == 3 and count(0.0, 5) == 0


def test_violations_counts_overfull_groups() -> None:
    dense = torch.ones(4, 8)
    assert parse_pattern("2:4").violations(dense) == 8
    assert parse_pattern("2x4:4").violations(dense) == 4
    assert parse_pattern("unstructured", 0.5).violations(dense) == 4
    assert parse_pattern("unstructured", 0.5, "layer").violations(dense) == 1


@pytest.mark.parametrize(
    ("spec", "sparsity", "granularity"),
    [
        ("2:4", 0.7, "row"),  # sparsity contradicts the pattern
        ("2x2:5", None, "row"),  # K > R*C
        ("5:4", None, "row"),  # N > M
        ("0:4", None, "row"),
        ("4x4:0", None, "row"),
        ("banana", None, "row"),
        ("2:", None, "row"),
        ("4x4", None, "row"),
        ("2:4:8", None, "row"),
        ("unstructured", -0.1, "row"),
        ("unstructured", 1.0, "row"),
        ("unstructured", 1.5, "row"),
        ("unstructured", 0.5, "column"),
        ("2:4", None, "layer"),  # granularity is for unstructured only
    ],
)
def test_parse_pattern_refusals(spec: str, sparsity: float | None, granularity: str) -> None:
    with pytest.raises(LLMPruneError):
        parse_pattern(spec, sparsity, granularity)


def test_parse_pattern_accepts_and_implies_sparsity() -> None:
    assert parse_pattern("2:4", 0.5).sparsity == 0.5
    assert parse_pattern(" 4x4:8 ").sparsity == 0.5
    assert parse_pattern("1:4").sparsity == 0.75
    assert parse_pattern("unstructured").sparsity == 0.5
    assert parse_pattern("unstructured", 0.0).sparsity == 0.0


@pytest.mark.parametrize(("spec", "shape"), [("4x4:8", (6, 8)), ("4x4:8", (8, 6)), ("2:4", (4, 6))])
def test_check_shape_refuses_untileable(spec: str, shape: tuple[int, int]) -> None:
    with pytest.raises(LLMPruneError):
        parse_pattern(spec).check_shape(shape)


@pytest.mark.parametrize("spec,sparsity,granularity", [("unstructured", 0.6, "row"), ("unstructured", 0.6, "layer"),
                                                       ("2:4", None, "row"), ("4x4:8", None, "row")])
def test_pattern_owns_its_geometry(spec, sparsity, granularity):
    """groups/ungroup round-trip, every group keeps keep_per_group, and project obeys both."""
    p = parse_pattern(spec, sparsity, granularity)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    groups = p.groups(w)
    assert groups.shape == p.group_shape(w.shape) and torch.equal(p.ungroup(groups, w.shape), w)
    mask = p.project(w.abs())
    assert (p.groups(mask).sum(-1) == p.keep_per_group(w.shape)).all()
    assert p.violations(w * mask) == 0 and p.violations(w) > 0
