"""MoE benchmark: how one decoder block's pruning time grows with the number of experts E.

A random Mixtral-shaped block (hidden 256, expert intermediate 512, top-2 routing, 1 layer) with E
experts of fixed size; random-token calibration (``--nsamples`` x ``--seqlen``). Each E is pruned with
admm 2:4 twice: experts solved together (``--batch-experts on``: one batched solve per fused tensor) and
one by one (``off``). With more experts each one sees fewer
tokens, so the row also records the tokens per expert and how many fell back to magnitude
(``--expert-min-tokens``).

    python benchmarks/moe.py --experts 4,8,16,64
    python benchmarks/moe.py --experts 16,64 --nsamples 2     # few tokens: experts fall back to magnitude

Rows are kept per (experts, calibration tokens, device).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune import PruneConfig, prune  # noqa: E402
from llmprune.report import environment, markdown_table, write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "moe.json"
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=512, max_position_embeddings=1024, num_experts_per_tok=2)


def one(experts: int, batched: bool, args: argparse.Namespace) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **SHAPE, num_local_experts=experts)).eval()
    calib = torch.randint(0, SHAPE["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(method="admm", pattern="2:4", batch_size=args.batch_size, batch_experts="on" if batched else "off",
                         expert_min_tokens=args.expert_min_tokens, device=args.device)
    t0 = time.perf_counter()
    record = prune(model, None, config, calib=calib, quiet=True).record
    return dict(block_seconds=round(record["seconds"]["blocks"][0], 3), total_seconds=round(time.perf_counter() - t0, 3),
                experts_info=record["experts"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="4,8,16,64", help="comma list of expert counts")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--expert-min-tokens", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    env = environment()
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []  # other settings' rows are kept
    for e in (int(x) for x in args.experts.split(",")):
        batched, loop = one(e, True, args), one(e, False, args)
        info = batched["experts_info"]
        rows = [r for r in rows if (r["experts"], r["tokens"], r["device"]) != (e, args.nsamples * args.seqlen, env["machine"])]
        rows.append(dict(experts=e, expert_shape=[2 * SHAPE["intermediate_size"], SHAPE["hidden_size"]],
                         tokens=args.nsamples * args.seqlen, tokens_min=info["tokens_min"],
                         tokens_median=info["tokens_median"], magnitude_fallback=info["magnitude_fallback"],
                         batched_block_s=batched["block_seconds"], one_by_one_block_s=loop["block_seconds"],
                         speedup=round(loop["block_seconds"] / batched["block_seconds"], 2), device=env["machine"],
                         commit=env["commit"], command=" ".join(["python", *sys.argv])))
        print(f"E={e}: batched {rows[-1]['batched_block_s']} s, one by one {rows[-1]['one_by_one_block_s']} s", flush=True)
    rows.sort(key=lambda r: (r["device"], -r["tokens"], r["experts"]))
    write_json_atomic(out, {"benchmark": "benchmarks/moe.py", "command": " ".join(["python", *sys.argv]),
                                       "env": env, "shape": SHAPE, "rows": rows})
    print(markdown_table(["experts", "calibration tokens", "tokens/expert (min / median)", "magnitude fallback", "batched s",
                          "one by one s", "speedup"],
                         [[r["experts"], r["tokens"], f"{r['tokens_min']} / {r['tokens_median']}", r["magnitude_fallback"],
                           r["batched_block_s"], r["one_by_one_block_s"], r["speedup"]] for r in rows]))
    print(json.dumps({"written": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
