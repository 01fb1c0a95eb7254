"""``llmprune inspect DIR``: per-layer pattern, measured sparsity and bytes, every layer verified."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from ..errors import LLMPruneError
from .reader import Checkpoint


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """Verify every tensor of a checkpoint and report each pruned layer plus totals.

    A layer that fails its checks is reported (``ok: False`` with the ``error``) rather than raised, so one
    bad layer does not hide the others; a checkpoint too broken to open raises :class:`LLMPruneError`.
    """
    ckpt = Checkpoint(path)
    layers, errors = [], []
    for name, pattern in ckpt.targets.items():
        row: dict[str, Any] = {"name": name, "pattern": pattern.label, "declared_sparsity": pattern.sparsity,
                               "sparsity": None, "dense_bytes": None, "stored_bytes": ckpt.stored_size(name),
                               "ok": True, "error": None}
        try:
            weight = ckpt.weight(name)
        except LLMPruneError as exc:
            row.update(ok=False, error=str(exc))
        else:
            row.update(sparsity=float((weight == 0).sum()) / weight.numel(),
                       dense_bytes=weight.numel() * weight.element_size())
        layers.append(row)
    for name in ckpt.params():
        if name not in ckpt.targets and name not in ckpt.experts:  # a fused tensor's experts are layers above
            try:
                ckpt.tensor(name)
            except LLMPruneError as exc:
                errors.append(str(exc))
    dense = sum(r["dense_bytes"] or 0 for r in layers)
    stored = sum(r["stored_bytes"] for r in layers)
    files = sum(p.stat().st_size for p in ckpt.path.rglob("*") if p.is_file())
    bad = sum(not r["ok"] for r in layers)
    totals = {"layers": len(layers), "failed_layers": bad, "dense_bytes": dense, "stored_bytes": stored,
              "ratio": stored / dense if dense else None, "checkpoint_bytes": files}
    return {"path": str(ckpt.path), "format": ckpt.fmt, "layers": layers, "errors": errors, "totals": totals,
            "ok": not bad and not errors}


def _table(report: dict[str, Any]) -> str:
    head = ("layer", "pattern", "sparsity", "dense bytes", "stored bytes", "ratio", "ok")
    rows = [head]
    for r in report["layers"]:
        ratio = f"{r['stored_bytes'] / r['dense_bytes']:.3f}" if r["dense_bytes"] else "-"
        sparsity = f"{r['sparsity']:.3f}" if r["sparsity"] is not None else "-"
        rows.append((r["name"], r["pattern"], sparsity, str(r["dense_bytes"] or "-"), str(r["stored_bytes"]),
                     ratio, "ok" if r["ok"] else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    t = report["totals"]
    ratio = f"{t['ratio']:.3f}" if t["ratio"] is not None else "-"
    lines.append(f"total: {t['layers']} pruned layers ({t['failed_layers']} failed), {t['dense_bytes']} dense bytes "
                 f"-> {t['stored_bytes']} stored ({ratio}); checkpoint {t['checkpoint_bytes']} bytes, "
                 f"format {report['format']}")
    lines += [f"FAIL {r['name']}: {r['error']}" for r in report["layers"] if not r["ok"]]
    lines += [f"FAIL {e}" for e in report["errors"]]
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    """CLI entry: 0 if every layer verifies, 1 if any fails its checks, 2 if the checkpoint can't be opened."""
    from ..flags import Parser

    parser = Parser(prog="python -m llmprune inspect", description=__doc__)
    parser.add_argument("dir", help="checkpoint folder written by llmprune")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = inspect(args.dir)
    except LLMPruneError as exc:
        print(f"llmprune: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0 if report["ok"] else 1
