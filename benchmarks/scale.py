"""Scale benchmark: prune randomly initialised Llama-shaped fp16 checkpoints streamed from disk.

Each shape is first written as sharded safetensors (tensor by tensor, never a whole model in memory);
each method then runs ``prune_checkpoint`` (load, calibration, pruning, saving) in a fresh process, so
peak host RSS and peak GPU memory are that run's own. Calibration: random token ids.

    python benchmarks/scale.py --shape 7b                      # admm 2:4 / 50%, sparsegpt, wanda
    python benchmarks/scale.py --shape 13b --blocks 4          # time 4 blocks, extrapolate the rest
    python benchmarks/scale.py --shape tiny --nsamples 8 --seqlen 64   # CPU smoke run

Rows go to benchmarks/results/scale.json (same-setting rows replaced, others kept) and a markdown
table is printed. Rows carry the device they ran on; nothing is estimated except ``est_full_seconds``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune import PruneConfig  # noqa: E402
from llmprune.report import git_commit, machine, markdown_table, write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
LLAMA = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=2048),
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # TinyLlama-1.1B
    "7b": dict(LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),  # Llama-2-7B
    "13b": dict(LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),  # Llama-2-13B
}
RUNS = ("admm@2:4", "admm@0.5", "sparsegpt@2:4", "wanda@2:4")
KEY = ("shape", "method", "pattern", "blocks", "nsamples", "seqlen", "device")


def write_random_checkpoint(path: Path, shape: dict, blocks: int, seed: int = 0, shard_bytes: int = 2**30) -> int:
    """A random fp16 Llama checkpoint with ``blocks`` layers, generated and written one tensor at a time
    (on the GPU when there is one); returns the parameter count of the full shape."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    full = LlamaConfig(**shape, dtype=torch.float16, architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        params = sum(p.numel() for p in LlamaForCausalLM(full).parameters())
    config = LlamaConfig(**{**shape, "num_hidden_layers": blocks}, dtype=torch.float16,
                         architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    specs = {name: p.shape for name, p in skeleton.state_dict().items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, s in specs.items():  # assign shards up front so their final names are known
        nbytes = s.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    path.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                t = torch.ones(specs[name], dtype=torch.float16)
            else:
                t = (torch.randn(specs[name], generator=gen, device=device, dtype=torch.float16) * 0.02).cpu()
            tensors[name] = t
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(s.numel() * 2 for s in specs.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config.save_pretrained(path)
    return params


def worker(args: argparse.Namespace) -> dict:
    """One pruning run in this (fresh) process; returns its row."""
    from llmprune import prune_checkpoint

    method, spec = args.run.split("@")
    pattern, sparsity = ("unstructured", float(spec)) if ":" not in spec else (spec, None)
    config = PruneConfig(method=method, pattern=pattern, sparsity=sparsity, batch_size=args.batch_size,
                         offload_activations=args.offload_activations, device=args.device)
    vocab = SHAPES[args.shape]["vocab_size"]
    calib = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    record = prune_checkpoint(args.src, args.dst, config, calib=calib, quiet=args.quiet).record
    seconds = time.perf_counter() - t0
    sec = record["seconds"]
    per_block = sec["blocks"]
    est = seconds + (args.total_blocks - len(per_block)) * sum(per_block) / len(per_block)
    return {
        "shape": args.shape, "params_b": float(f"{args.params / 1e9:.3g}"), "method": method,
        "pattern": spec if ":" in spec else f"{float(spec):.0%}",
        "blocks": len(per_block), "blocks_total": args.total_blocks, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "prune_seconds": round(seconds, 2), "est_full_seconds": round(est, 2),
        "seconds": {k: round(v, 3) for k, v in sec.items() if k != "blocks"},
        "block_seconds": [round(s, 3) for s in per_block],
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
        "device": machine() if cuda else f"cpu: {machine()}", "sparsity": round(record["sparsity"], 4),
        "commit": git_commit(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="7b", choices=tuple(SHAPES))
    p.add_argument("--runs", nargs="+", default=list(RUNS), help="method@pattern, e.g. admm@2:4 wanda@0.5")
    p.add_argument("--blocks", type=int, default=None, help="time only this many blocks (default: all)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--offload-activations", action="store_true")
    p.add_argument("--cache", default=None, help="where the random checkpoints go (default: a temp dir, removed)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--run", "--src", "--dst"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--params", "--total-blocks"):
        p.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    shape = SHAPES[args.shape]
    total = shape["num_hidden_layers"]
    blocks = min(args.blocks or total, total)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="llmprune-scale-"))
    src = cache / f"{args.shape}-{blocks}blocks"
    rows = []
    try:
        t0 = time.perf_counter()
        if not src.exists():
            params = write_random_checkpoint(src, shape, blocks)
            (src / "params.txt").write_text(str(params))
        params = int((src / "params.txt").read_text())
        print(f"random {args.shape} checkpoint ({blocks} of {total} blocks) at {src}: "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
        for run in args.runs:
            dst = cache / f"out-{run.replace('@', '-').replace(':', '')}"
            cmd = [sys.executable, __file__, "--worker", "--shape", args.shape, "--run", run, "--src", str(src),
                   "--dst", str(dst), "--params", str(params), "--total-blocks", str(total), "--nsamples",
                   str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
                   "--device", args.device] + ["--offload-activations"] * args.offload_activations + ["--quiet"] * args.quiet
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            shutil.rmtree(dst, ignore_errors=True)
            if done.returncode != 0:
                raise SystemExit(f"{run} failed (exit {done.returncode})")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)

    out = Path(args.out)
    old = json.loads(out.read_text())["rows"] if out.is_file() else []
    keys = {tuple(r[k] for k in KEY) for r in rows}
    write_json_atomic(out, {"benchmark": "benchmarks/scale.py", "rows": [r for r in old if tuple(r[k] for k in KEY) not in keys] + rows})
    print(markdown_table(
        ["shape", "params (B)", "method", "pattern", "blocks", "prune s", "est. full s", "peak GPU GiB", "peak host GiB", "device"],
        [[r["shape"], r["params_b"], r["method"], r["pattern"], f"{r['blocks']}/{r['blocks_total']}", r["prune_seconds"],
          r["est_full_seconds"], r["peak_gpu_gib"] if r["peak_gpu_gib"] is not None else "-", r["peak_host_gib"], r["device"]]
         for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
