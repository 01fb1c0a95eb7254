"""Fine-tuning benchmark: recover SmolLM2-135M from our one-shot admm, per pattern x mode x loss.

Each row: one-shot admm prune (calibration: ``--nsamples`` x ``--seqlen`` windows of wiki.valid.raw),
WikiText-2 test perplexity before, ``llmprune.finetune`` on wiki.valid.raw windows (the held-out tenth is
the validation split; the test text is never trained on), perplexity after. The ``dense`` reference row
gives the *dense* model the same fine-tuning (CE, same text and tokens), so recovery is not confused
with adapting to WikiText. Rows go to benchmarks/results/finetune.json after each one (reused when every
setting, the commit included, matches), with tokens, wall time and the row's peak memory.

    python benchmarks/finetune.py --data-dir ../shared/data --tokens 16384 --rows 2:4/masked/ce,dense
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

from llmprune import FinetuneConfig, PruneConfig, evaluate, finetune, prune  # noqa: E402
from llmprune.data import calibration_windows  # noqa: E402
from llmprune.models import default_model, load_model  # noqa: E402
from llmprune.report import environment, markdown_table, write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "finetune.json"
PATTERNS = {"2:4": ("2:4", None), "4x4:8": ("4x4:8", None), "50%": ("unstructured", 0.5)}
LOSSES = {"ce": dict(ce=1.0), "ce+kd": dict(ce=1.0, kd=1.0), "ce+squarehead": dict(ce=1.0, squarehead=1.0)}
KEY = ("row", "method", "tokens", "seqlen", "batch_size", "lr", "nsamples", "calib_seqlen", "eval_windows", "device", "commit")


def peak_rss_gb(reset: bool = False) -> float | None:
    """This process's peak resident memory since the last reset (Linux), so each row reports its own."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak (VmHWM) to the current RSS
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1e6, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="2:4/masked/ce,2:4/masked/ce+squarehead,2:4/admm/ce,dense",
                   help="comma list of PATTERN/MODE/LOSS (patterns 2:4, 4x4:8, 50%%; modes masked, admm, sr-ste; "
                        "losses ce, ce+kd, ce+squarehead) and 'dense'")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--method", default="admm", help="the one-shot pruner the rows start from")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=lambda v: None if v == "all" else int(v), default=8,
                   help="test windows evaluated, or 'all' (the full protocol, with --nsamples 128 --calib-seqlen 2048)")
    p.add_argument("--model", default=None, help="dense model to prune and fine-tune (default: the bundled SmolLM2)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--note", default=None, help="free text stored with the rows (e.g. that other jobs shared the CPU)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    env = environment()
    out = Path(args.out)
    rows: list[dict] = json.loads(out.read_text())["rows"] if out.exists() else []
    base = dict(method=args.method, tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch_size, lr=args.lr, nsamples=args.nsamples,
                calib_seqlen=args.calib_seqlen, eval_windows=args.eval_windows or "all", device=env["machine"],
                commit=env["commit"])
    dense, tokenizer = load_model(args.model or default_model())
    calib = calibration_windows(tokenizer, "wikitext2", args.nsamples, args.calib_seqlen, 0, args.data_dir)
    eval_kw = dict(windows=args.eval_windows, device=args.device, data_dir=args.data_dir, quiet=True)
    one_shot: dict[str, tuple] = {}
    for spec in args.rows.split(","):
        want = dict(base, row=spec)
        if any(all(r.get(k) == want[k] for k in KEY) for r in rows):
            continue
        peak_rss_gb(reset=True)
        t0 = time.perf_counter()
        if spec == "dense":
            model, patterns, masks, before = copy.deepcopy(dense), {}, None, evaluate(dense, tokenizer, **eval_kw)
            mode, loss = "masked", "ce"
        else:
            label, mode, loss = spec.split("/")
            if label not in one_shot:
                pruned = copy.deepcopy(dense)
                pattern, sparsity = PATTERNS[label]
                result = prune(pruned, tokenizer, PruneConfig(method=args.method, pattern=pattern, sparsity=sparsity,
                                                              device=args.device), calib=calib, quiet=True)
                one_shot[label] = (pruned, result.patterns, result.masks, evaluate(pruned, tokenizer, **eval_kw))
            pruned, patterns, masks, before = one_shot[label]
            model = copy.deepcopy(pruned)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t1 = time.perf_counter()
        cfg = FinetuneConfig(mode=mode, tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch_size, lr=args.lr,
                             eval_every=8, device=args.device, data_dir=args.data_dir, **LOSSES[loss])
        teacher = dense if cfg.needs_teacher else None
        tuned = finetune(model, tokenizer, cfg, patterns, masks, teacher)
        seconds = time.perf_counter() - t1
        after = evaluate(model, tokenizer, **eval_kw)
        row = dict(want, finetune_mode=mode, loss=loss, ppl_before=before["wikitext2"], ppl_after=after["wikitext2"],
                   change=after["wikitext2"] / before["wikitext2"] - 1, finetune_seconds=round(seconds, 1),
                   row_seconds=round(time.perf_counter() - t0, 1), trained_tokens=tuned.record["tokens"],
                   val=tuned.record["val"], peak_rss_row_gb=peak_rss_gb(),
                   command=" ".join(["python", *sys.argv]), **({"note": args.note} if args.note else {}),
                   **({"peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)} if torch.cuda.is_available() else {}))
        rows = [r for r in rows if not all(r.get(k) == row[k] for k in KEY)] + [row]
        write_json_atomic(out, {"benchmark": "benchmarks/finetune.py", "env": env, "rows": rows})
        print(f"{spec}: ppl {row['ppl_before']:.2f} -> {row['ppl_after']:.2f} ({row['change']:+.1%}) "
              f"in {seconds:.0f} s", flush=True)
    print(markdown_table(["row", "tokens", "ppl before", "ppl after", "change", "finetune s"],
                         [[r["row"], r["trained_tokens"], round(r["ppl_before"], 2), round(r["ppl_after"], 2),
                           f"{r['change']:+.1%}", r["finetune_seconds"]] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
