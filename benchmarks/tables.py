"""The README's result tables, generated from benchmarks/results/*.json (never typed by hand).

Each table sits in README.md between ``<!-- table:NAME -->`` and ``<!-- /table -->``. ``python
benchmarks/tables.py`` rewrites them; ``--check`` exits 1 if any differs from its JSON (a test runs it,
so a table that disagrees with its JSON fails CI). Published reference numbers, which we did not
measure, come from ``results/reference.json`` and are labelled as such.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ["50%", "60%", "70%", "2:4", "4:8", "4x4:8"]
METHODS = ["admm", "sparsegpt", "wanda", "magnitude"]
FULL = dict(nsamples=128, seqlen=2048, eval_windows="all")
SHRUNK = dict(nsamples=16, seqlen=512, eval_windows=8)


def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _rows(where: dict[str, Any], device: str, variant: str, quant: str | None = None) -> dict[tuple[str, str], dict]:
    """The newest row per (method, pattern) of one protocol, device kind, variant and quantization."""
    out: dict[tuple[str, str], dict] = {}
    for r in _load("quality.json")["rows"]:
        if all(r.get(k) == v for k, v in where.items()) and r["device"].startswith(device) and (
                r["variant"] == variant and r.get("quant") == quant or r["method"] == "dense"):
            out[(r["method"], r["pattern"])] = r
    return out


def _ppl(r: dict | None, bold: bool = False) -> str:
    if r is None:
        return "–"
    cell = f"{r['ppl']['wikitext2']:.2f}"
    return f"**{cell}**" if bold else cell


def _secs(rows: dict, method: str) -> str:
    cells = [rows.get((method, p)) for p in ("50%", "2:4")]
    if not any(cells):
        return "–"
    mark = " †" if any(c and c.get("note") for c in cells) else ""
    return " / ".join("–" if c is None else f"{c['prune_seconds']:.1f}" for c in cells) + mark


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def full_grid() -> str:
    rows = _rows(FULL, "NVIDIA", "default")
    body = [["dense", *[_ppl(rows.get(("dense", "dense")))] * len(COLUMNS), "–"]]
    for m in METHODS:
        label = "**admm** (ours, defaults)" if m == "admm" else f"{m} (ours)"
        cells = [_ppl(rows.get((m, c)), bold=m == "admm") for c in COLUMNS]
        secs = _secs(rows, m)
        body.append([label, *cells, f"**{secs}**" if m == "admm" else secs])
    for ref in _load("reference.json")["rows"]:
        cells = [f"{ref['ppl'][c]:.2f}" if c in ref["ppl"] else "–" for c in COLUMNS]
        label = f"{ref['method']} published code)" if ref["method"].endswith(",") else f"{ref['method']} (published code)"
        body.append([label, *cells, ref["prune_seconds"]])
    return _table(["method", *COLUMNS, "prune s (50% / 2:4)"], body)


def _options(where: dict[str, Any], device: str, variants: list[tuple[str, str]], columns: list[str],
             seconds: bool) -> str:
    body = []
    for variant, label in variants:
        rows = _rows(where, device, variant)
        cells = [_ppl(rows.get(("admm", c))) for c in columns]
        if variant == "owl":
            cells = [c if col.endswith("%") else "n/a" for c, col in zip(cells, columns)]
        body.append([label, *cells, *([_secs(rows, "admm")] if seconds else [])])
    return _table(["admm with", *columns, *(["prune s (50% / 2:4)"] if seconds else [])], body)


def full_options() -> str:
    return _options(FULL, "NVIDIA", [("default", "defaults"), ("paper", "paper variant (`ADMMConfig.paper()`)"),
                                     ("owl", "`--allocation owl`"), ("dense-targets", "`--dense-targets`"),
                                     ("tune1", "`--tune-epochs 1`"), ("tune5", "`--tune-epochs 5`")],
                    COLUMNS[:4], seconds=True)


def shrunk_grid() -> str:
    rows = _rows(SHRUNK, "x86_64 CPU", "default")
    body = [["dense", *[_ppl(rows.get(("dense", "dense")))] * len(COLUMNS)]]
    for m in METHODS:
        label = "**admm** (ours, defaults)" if m == "admm" else m
        body.append([label, *[_ppl(rows.get((m, c)), bold=m == "admm") for c in COLUMNS]])
    return _table(["method", *COLUMNS], body)


def shrunk_options() -> str:
    return _options(SHRUNK, "x86_64 CPU", [("default", "defaults"), ("owl", "`--allocation owl` (λ 0.08, m 5)"),
                                           ("tune5 lr1e-4 bs2", "`--tune-epochs 5 --tune-lr 1e-4`"),
                                           ("tune5 lr3e-4 bs2", "`--tune-epochs 5 --tune-lr 3e-4`")],
                    COLUMNS[:4], seconds=False)


def quant() -> str:
    """Sparse + int4 (g128, symmetric) on the shrunk CPU protocol, beside the full-precision admm rows."""
    columns = ["0%", "2:4", "4x4:8", "50%"]
    fp, rows = _rows(SHRUNK, "x86_64 CPU", "default"), _rows(SHRUNK, "x86_64 CPU", "default", "int4g128")
    body = [["dense", *[_ppl(fp.get(("dense", "dense")))] * len(columns)],
            ["admm, full precision (no --quant)", "–", *[_ppl(fp.get(("admm", c))) for c in columns[1:]]]]
    labels = {"admm": "**admm joint** (Π_quant ∘ Π_pattern)", "sparsegpt": "sparsegpt joint",
              "admm+gptq": "admm, then gptq (the naive chain)", "gptq": "gptq (magnitude support)"}
    for m, label in labels.items():
        if any((m, c) in rows for c in columns):
            body.append([label, *[_ppl(rows.get((m, c)), bold=m == "admm") for c in columns]])
    return _table(["+ int4 g128", *columns], body)


def size() -> str:
    body = []
    for r in _load("size.json")["rows"]:
        name = f"{r['sparsity']:.0%} unstructured" if r["pattern"] == "unstructured" else r["pattern"]
        if r.get("quant"):
            name = f"{r['quant']} alone (no sparsity)" if r["sparsity"] == 0 else f"{name} + {r['quant']}"
        whole = f"{r['checkpoint_dense_bytes'] / 1e6:.1f} MB → {r['checkpoint_compressed_bytes'] / 1e6:.1f} MB"
        body.append([name, f"{r['ratio']:.4g}", whole])
    return _table(["pattern", "pruned Linears: compressed / dense bytes", "whole checkpoint, dense → compressed"], body)


def finetune_grid() -> str:
    """Perplexity after fine-tuning, pattern/mode by loss (the newest row of each cell, CPU budget rows)."""
    rows = {r["row"]: r for r in _load("finetune.json")["rows"] if r["eval_windows"] == 8}
    losses = {"ce": "CE", "ce+kd": "CE + KD", "ce+squarehead": "CE + SquareHead"}
    body = []
    for pattern in ("2:4", "4x4:8", "50%"):
        for mode in ("masked", "admm", "sr-ste"):
            cells = [rows.get(f"{pattern}/{mode}/{loss}") for loss in losses]
            start = next((r["ppl_before"] for r in cells if r), None)
            body.append([f"{pattern} {mode}", f"{start:.2f}" if start else "–",
                         *[f"{r['ppl_after']:.2f} ({r['change']:+.0%})" if r else "not run" for r in cells]])
    return _table(["pattern, mode", "one-shot", *losses.values()], body)


def finetune() -> str:
    rows = _load("finetune.json")["rows"]
    dense = next((r for r in rows if r["row"] == "dense"), None)

    def ratio(r: dict) -> str:  # × the dense model, before and after the same fine-tuning
        if dense is None or r is dense:
            return "–"
        return f"{r['ppl_before'] / dense['ppl_before']:.2f} → {r['ppl_after'] / dense['ppl_after']:.2f}"

    body = []
    for r in rows:
        label = "dense model, same fine-tuning (reference)" if r is dense else r["row"]
        peak = f"{r['peak_rss_row_gb']:.1f}" if r.get("peak_rss_row_gb") else "–"  # older rows: the process's peak so far
        body.append([label, str(r["trained_tokens"]), f"{r['ppl_before']:.2f} → {r['ppl_after']:.2f}",
                     f"{r['change']:+.1%}", ratio(r), f"{r['finetune_seconds']:.0f}", peak, r["commit"]])
    return _table(["start (pattern/mode/loss)", "tokens", "ppl before → after", "change", "× dense before → after",
                   "finetune s", "peak RSS GB", "commit"], body)


def scale() -> str:
    body = [[r["shape"], str(r["params_b"]), r["method"], r["pattern"], f"{r['blocks']}/{r['blocks_total']}",
             str(r["prune_seconds"]), "–" if r["peak_gpu_gib"] is None else str(r["peak_gpu_gib"]), str(r["peak_host_gib"]),
             r["device"], r["commit"][:12]] for r in _load("scale.json")["rows"]]
    return _table(["shape", "params (B)", "method", "pattern", "blocks", "prune s", "peak GPU GiB", "peak host GiB",
                   "device", "commit"], body)


def kernels() -> str:
    """Layer rows at M = 1 and 2048 and the end-to-end rows of benchmarks/results/kernels.json (GPU only)."""
    path = RESULTS / "kernels.json"
    rows = [r for r in json.loads(path.read_text()) if "CPU" not in r["device"]] if path.is_file() else []
    if not rows:
        return "_No kernel row has been measured on a GPU yet (`benchmarks/device_run.py` writes them)._"
    copy = next((r["gbps"] for r in rows if r["kernel"] == "copy"), None)
    body = [[r["shape"], str(r["m"]), r["dtype"], r["format"], r["kernel"], str(r["us"]), str(r["speedup"]),
             str(r.get("gbps", "")), r["device"], r["commit"]]
            for r in rows if r["kernel"] != "copy" and (r.get("e2e") or r["m"] in (1, 2048))]
    head = f"Copy bandwidth in the same run: {copy} GB/s.\n\n" if copy else ""
    return head + _table(["shape", "M / batch", "dtype", "format", "kernel", "µs", "vs dense", "GB/s", "device", "commit"],
                         body)


def demo() -> str:
    d = _load("demo.json")
    sec = d["seconds"]
    wall = f"{int(d['wall_seconds'] // 60)} min {d['wall_seconds'] % 60:.0f} s"
    phases = ", ".join(f"{k} {sec[k]:.0f} s" for k in ("load", "prune", "save", "eval") if k in sec)
    return _table(["2:4 ppl (8 windows)", "wall time", "phases", "peak RSS", "machine", "commit"],
                  [[f"{d['ppl']['wikitext2']:.2f}", wall, phases, f"{d['peak_rss_gb']:.1f} GB", d["machine"], d["commit"]]])


def moe() -> str:
    """benchmarks/results/moe.json: one block's pruning time against the number of experts."""
    path = RESULTS / "moe.json"
    if not path.is_file():
        return "_Not measured yet (`python benchmarks/moe.py`)._"
    rows = _load("moe.json")["rows"]
    body = [[str(r["experts"]), str(r["tokens"]), f"{r['tokens_min']} / {r['tokens_median']}", str(r["magnitude_fallback"]),
             f"{r['one_by_one_block_s']:.2f}", f"{r['batched_block_s']:.2f}", f"{r['speedup']:.2f}×", r["device"],
             r["commit"][:12]] for r in rows]
    return _table(["experts", "calibration tokens", "tokens per expert (min / median)", "magnitude fallback (of 2E)", "one by one s",
                   "batched s", "batched speed-up", "device", "commit"], body)


def cpu_linear() -> str:
    """benchmarks/results/cpu.json: one Linear, 2 threads, ms and speed-up over dense bf16, per kind."""
    path = RESULTS / "cpu.json"
    rows = [r for r in _load("cpu.json")["rows"] if r["part"] == "linear" and r["threads"] == 2] if path.is_file() else []
    if not rows:
        return "_Not measured yet (`python benchmarks/cpu.py --part linear`)._"
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    cells: dict[tuple[str, int], dict[str, str]] = {}
    for r in rows:
        mark = "" if r["ok"] else " (wrong!)"
        cells.setdefault((r["shape"], r["m"]), {})[r["kind"]] = f"{r['ms']:.2f} ({r['vs_bf16']:.2f}×){mark}"
    body = [[shape, str(m), *(c.get(k, "–") for k in kinds)] for (shape, m), c in cells.items()]
    first = rows[0]
    cache = (f"; each call reads a copy of the weight not in the cache (copies fill twice the {first['l3_mb']} MB "
             "L3)" if "l3_mb" in first else "")
    return (f"{first['cpu']} ({', '.join(first['simd'])}), kernels built for {first['kernel_isa']}, torch "
            f"{first['torch']}, commit {first['commit']}; copy bandwidth in the same run "
            f"{_load('cpu.json')['copy_gbps'].get(first['cpu'], '?')} GB/s{cache}.\n\n"
            + _table(["shape", "M", *kinds], body))


def cpu_e2e() -> str:
    """benchmarks/results/cpu.json: greedy decode tokens/s, batch 1, per model, storage, loop and head."""
    path = RESULTS / "cpu.json"
    rows = [r for r in _load("cpu.json")["rows"] if r["part"] == "e2e"] if path.is_file() else []
    if not rows:
        return "_Not measured yet (`python benchmarks/cpu.py --part e2e`)._"
    rows.sort(key=lambda r: (r["model"], r["loop"] != "llama.cpp", r["loop"], r["lm_head"]))
    fmt = lambda r, k, f: format(r[k], f) if k in r else "–"  # noqa: E731 (llama.cpp rows time decode only)
    return _table(["model", "Linears", "loop", "lm_head", "decode tokens/s", "prefill tokens/s", "new tokens",
                   "threads", "peak RSS GB", "cpu", "commit"],
                  [[r["model"], r["kind"], r["loop"], r["lm_head"], f"{r['decode_tokens_per_s']:.1f}",
                    fmt(r, "prefill_tokens_per_s", ".0f"), str(r["new_tokens"]), str(r["threads"]),
                    fmt(r, "peak_rss_gb", ".1f"), r["cpu"], r["commit"]] for r in rows])


def coverage() -> str:
    """benchmarks/results/coverage.json: what is pruned per architecture (one block of a tiny config)."""
    body = []
    for r in _load("coverage.json")["rows"]:
        if "refused" in r:
            body.append([r["arch"], "refused: " + r["refused"].split(",")[0], "–", "–"])
            continue
        experts = f" + {r['experts']} expert matrices ({', '.join(r['expert_layout'])})" if r["experts"] else ""
        body.append([r["arch"], f"{r['linears']} Linears{experts}", f"{r['share']:.1%}",
                     ", ".join(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in r["dense"]) or "–"])
    return _table(["architecture", "pruned per block", "share of block weights", "kept dense"], body)


TABLES: dict[str, Callable[[], str]] = {"cpu-linear": cpu_linear, "cpu-e2e": cpu_e2e, "coverage": coverage, "moe": moe, "demo": demo, "finetune": finetune,
                                        "finetune-grid": finetune_grid, "scale": scale, "kernels": kernels, "quality-full": full_grid, "quality-full-options": full_options,
                                        "quality-shrunk": shrunk_grid, "quality-shrunk-options": shrunk_options,
                                        "size": size, "quant": quant}
# a block's body never spans another block's start, so an empty body cannot swallow the text after it
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>(?:(?!<!-- table:).)*?)(<!-- /table -->)", re.S)


def render(readme: str) -> str:
    def sub(m: re.Match) -> str:
        if m["name"] not in TABLES:
            raise SystemExit(f"README names an unknown table {m['name']!r}")
        return m[1] + TABLES[m["name"]]() + "\n" + m[4]

    return BLOCK.sub(sub, readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if README.md's tables differ from the JSON")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = render(text)
    missing = set(TABLES) - {m["name"] for m in BLOCK.finditer(text)}
    if args.check:
        if new != text or missing:
            print(f"README tables disagree with benchmarks/results (missing: {sorted(missing)}); "
                  "run python benchmarks/tables.py", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
