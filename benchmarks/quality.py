"""Quality benchmark: prune SmolLM2-135M with each method at each pattern, WikiText-2 perplexity.

Full protocol (issue #3): 128 x 2048 calibration windows from wiki.valid.raw (seed 0), all 148 test
windows of 2048. Flags shrink it for CPU, e.g.

    python benchmarks/quality.py --data-dir ../shared/data --nsamples 16 --seqlen 512 --eval-windows 8

With ``--quant int4`` every row also quantizes the kept weights (the row's ``quant`` field, e.g. ``int4g128``);
pattern ``0%`` is quantization alone, and method ``admm+gptq`` is the naive chain: admm prunes in full
precision, then gptq quantizes the pruned model (recalibrated, keeping its mask).

Prints a markdown table and writes benchmarks/results/quality.json after every row (one row per
method x pattern). Rows already in the file with the same setting are reused (their commit is recorded), so an
interrupted run resumes; --force recomputes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune import PruneConfig, evaluate, prune  # noqa: E402
from llmprune.data import calibration_windows  # noqa: E402
from llmprune.engine import resolve_device  # noqa: E402
from llmprune.methods import METHODS  # noqa: E402
from llmprune.models import default_model, load_model  # noqa: E402
from llmprune.quant import parse_quant  # noqa: E402
from llmprune.report import environment, markdown_table, write_json_atomic  # noqa: E402

PATTERNS = {"0%": ("unstructured", 0.0), "50%": ("unstructured", 0.5), "60%": ("unstructured", 0.6), "70%": ("unstructured", 0.7),
            "2:4": ("2:4", None), "4:8": ("4:8", None), "4x4:8": ("4x4:8", None)}
RESULTS = Path(__file__).resolve().parent / "results" / "quality.json"
# every setting that changes a row's result: a row is reused only when all of them (the commit too) match
KEY = ("model", "method", "pattern", "sparsity", "nsamples", "seqlen", "calib", "eval_windows", "device", "variant",
       "commit", "options", "config", "quant")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: bundled SmolLM2-135M-Instruct GGUF")
    p.add_argument("--methods", default="admm,sparsegpt,wanda,magnitude")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma list of " + ", ".join(PATTERNS).replace("%", "%%"))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None, help="default: all (148 for SmolLM2)")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quant", default="none", help="int4, int8 or none: quantize the kept weights too")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--options", default="{}", help='JSON method options, e.g. \'{"admm": {"iters": 40}}\'')
    p.add_argument("--config", default="{}", help='JSON PruneConfig fields, e.g. \'{"sequential": true}\'')
    p.add_argument("--variant", default="default", help="label stored with the rows (for ablations)")
    p.add_argument("--note", default="", help="free text stored with the rows (e.g. that other jobs shared the device)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--force", action="store_true", help="recompute rows already in --out")
    args = p.parse_args()

    env = environment()
    options = json.loads(args.options)
    extra = json.loads(args.config)
    device = str(resolve_device(args.device))
    source = args.model or default_model()
    model, tokenizer = load_model(source)
    model_name = Path(source).name
    calib = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, 0, args.data_dir)
    eval_kw = dict(windows=args.eval_windows, device=args.device, data_dir=args.data_dir)

    quant = parse_quant(args.quant, args.group_size)
    base = dict(model=model_name, nsamples=args.nsamples, seqlen=args.seqlen, calib=args.calib,
                eval_windows=args.eval_windows or "all", device=env["machine"], variant=args.variant, commit=env["commit"],
                config=extra, quant=None if quant is None else str(quant))
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text())["rows"] if out.exists() else []
    command = " ".join(["python", *sys.argv])

    def measured(method: str, label: str) -> dict | None:
        want = dict(base, method=method, pattern=label)
        want["options"] = {} if method == "dense" else options.get(method, {})
        # dense is the same for every variant, option and config
        ignore = {"sparsity", "variant", "options", "config", "quant"} if method == "dense" else {"sparsity"}
        hits = [r for r in rows if all(r.get(k, {} if k in ("options", "config") else None) == want.get(k)
                                       for k in KEY if k not in ignore)]
        return None if args.force or not hits else hits[-1]

    def record(row: dict) -> None:
        row = dict(row, command=command, **({"note": args.note} if args.note else {}))  # rows of several commands share the file
        rows[:] = [r for r in rows if tuple(r.get(k) for k in KEY) != tuple(row.get(k) for k in KEY)] + [row]
        write_json_atomic(out, {"command": command, "env": env, "rows": rows})

    done = [measured("dense", "dense")]
    if done[0] is None:
        record(dict(base, method="dense", pattern="dense", sparsity=0.0, quant=None, ppl=evaluate(model, tokenizer, **eval_kw),
                    prune_seconds=0.0, options={}))
        done = [rows[-1]]
    print(f"dense: {done[0]['ppl']}", flush=True)
    for method in args.methods.split(","):
        if any(m not in METHODS for m in method.split("+")):
            raise SystemExit(f"unknown method {method}")
        for label in args.patterns.split(","):
            if (row := measured(method, label)) is None:
                row = run_one(model, tokenizer, calib, method, label, args, options.get(method, {}), extra, eval_kw, base,
                              device)
                record(row)
            done.append(row)
            print(f"{method} {label}: ppl {row['ppl']['wikitext2']:.2f}  prune {row['prune_seconds']:.1f}s", flush=True)
    print(table(done))


def run_one(model, tokenizer, calib, method, label, args, options, extra, eval_kw, base, device) -> dict:  # noqa: ANN001
    """Prune a copy of ``model`` with one method and pattern; evaluate it."""
    pattern, sparsity = PATTERNS[label]
    pruned = copy.deepcopy(model)
    steps = method.split("+")  # a chain: every step but the last in full precision
    t = time.perf_counter()
    for k, step in enumerate(steps):
        quant = dict(quant=args.quant, group_size=args.group_size) if k == len(steps) - 1 else {}
        cfg = PruneConfig(method=step, pattern=pattern, sparsity=sparsity, device=args.device,
                          batch_size=args.batch_size, method_options=options if k == 0 else {}, **quant, **extra)
        result = prune(pruned, tokenizer, cfg, calib=calib, quiet=True).record
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    ppl = evaluate(pruned, tokenizer, **eval_kw)
    return dict(base, method=method, pattern=label, sparsity=result["sparsity"], ppl=ppl, prune_seconds=seconds, options=options,
                config=extra)


def table(rows: list[dict]) -> str:
    labels = [label for label in PATTERNS if any(r["pattern"] == label for r in rows)]

    def name(r: dict) -> str:
        quant = f" +{r['quant']}" if r.get("quant") else ""
        return r["method"] + quant if r["method"] == "dense" or r["variant"] == "default" else f"{r['method']}{quant} [{r['variant']}]"

    body = []
    for method in dict.fromkeys(map(name, rows)):
        by = {r["pattern"]: r for r in rows if name(r) == method}
        if method == "dense":
            body.append(["dense", *[f"{by['dense']['ppl']['wikitext2']:.2f}"] * len(labels), "-"])
            continue
        cells = [f"{by[label]['ppl']['wikitext2']:.2f}" if label in by else "-" for label in labels]
        secs = " / ".join(f"{by[label]['prune_seconds']:.1f}" for label in labels if label in by)
        body.append([method, *cells, secs])
    return markdown_table(["method", *labels, "prune s"], body)


if __name__ == "__main__":
    main()
