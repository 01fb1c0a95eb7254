"""Which GPU kernel serves a token count M, per (layout, shape class).

A table maps a layout key (``"2:4"``, ``"4x4:8"``, ``"1x8:4"`` ...) and a shape class
(``round(log2(N*K))``) to thresholds ``[(m_max, kernel), ..., (None, kernel)]``: the first entry with
``M <= m_max`` wins. Kernels: ``"triton"`` (packed kernel), ``"cusparselt"`` (2:4 only) and ``"dense"``
(decompress the packed weight, then cuBLAS; nothing dense is kept between calls).

The built-in defaults are guesses, not measurements, and never name cuSPARSELt: its GPU test failed on an
H100 (illegal instruction after ``_cslt_sparse_mm_search``), so it is opt-in until that test passes.
``benchmarks/kernels.py --dispatch-out`` derives a measured table, used when saved as
``llmprune/kernels/dispatch.json`` or named by ``$LLMPRUNE_KERNELS_DISPATCH``.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from functools import cache
from pathlib import Path

from .formats import Layout

KERNELS = ("triton", "cusparselt", "dense")
Rules = list[tuple[int | None, str]]

DEFAULTS: dict[str, Rules] = {
    "2:4": [(64, "triton"), (None, "dense")],
    "tile": [(64, "triton"), (None, "dense")],
}


def layout_key(lay: Layout) -> str:
    if lay.fmt == "bitmask":
        return "unstructured"
    return "2:4" if lay.fmt == "2:4" else f"{lay.r}x{lay.c}:{lay.kv}"


def shape_class(n: int, k: int) -> int:
    return round(math.log2(n * k))


class DispatchTable:
    """Thresholds per layout key and shape class, with the defaults behind them."""

    def __init__(self, rules: dict[str, dict[int, Rules]] | None = None) -> None:
        self.rules = rules or {}

    def rules_for(self, lay: Layout, n: int, k: int) -> Rules:
        by_class = self.rules.get(layout_key(lay))
        if not by_class:
            return DEFAULTS["2:4" if lay.fmt == "2:4" else "tile"]
        cls = shape_class(n, k)
        return by_class[min(by_class, key=lambda c: (abs(c - cls), c))]

    def choose(self, lay: Layout, n: int, k: int, m: int) -> str:
        for m_max, kernel in self.rules_for(lay, n, k):
            if m_max is None or m <= m_max:
                return kernel
        return "dense"

    @classmethod
    def from_rows(cls, rows: list[dict]) -> DispatchTable:
        """Fastest kernel per (format, shape class, M) from benchmark rows, summed over dtypes."""
        total: dict[tuple[str, int, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        count: dict[tuple[str, int, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for row in rows:
            if row.get("e2e") or row["kernel"] not in KERNELS:
                continue
            key = (row["format"], shape_class(row["n"], row["k"]), row["m"])
            total[key][row["kernel"]] += row["us"]
            count[key][row["kernel"]] += 1
        best: dict[str, dict[int, list[tuple[int, str]]]] = defaultdict(lambda: defaultdict(list))
        for (fmt, cls_, m), times in sorted(total.items()):
            full = max(count[(fmt, cls_, m)].values())  # only kernels measured for every dtype compete
            kernel = min((t, k) for k, t in times.items() if count[(fmt, cls_, m)][k] == full)[1]
            best[fmt][cls_].append((m, kernel))
        rules: dict[str, dict[int, Rules]] = {}
        for fmt, by_class in best.items():
            rules[fmt] = {}
            for cls_, points in by_class.items():
                merged: Rules = []
                for m, kernel in points:
                    if merged and merged[-1][1] == kernel:
                        merged[-1] = (m, kernel)
                    else:
                        merged.append((m, kernel))
                merged[-1] = (None, merged[-1][1])
                rules[fmt][cls_] = merged
        return cls(rules)

    def save(self, path: str | Path) -> None:
        data = {fmt: {str(c): [list(r) for r in rules] for c, rules in by.items()} for fmt, by in self.rules.items()}
        Path(path).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DispatchTable:
        data = json.loads(Path(path).read_text())
        return cls({fmt: {int(c): [(m, k) for m, k in rules] for c, rules in by.items()} for fmt, by in data.items()})


@cache
def default_table() -> DispatchTable:
    """``$LLMPRUNE_KERNELS_DISPATCH``, else ``llmprune/kernels/dispatch.json`` if present, else the defaults (read once)."""
    path = os.environ.get("LLMPRUNE_KERNELS_DISPATCH") or Path(__file__).with_name("dispatch.json")
    return DispatchTable.load(path) if Path(path).is_file() else DispatchTable()
