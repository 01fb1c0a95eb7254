"""Benchmark llmprune's packed sparse kernels on a CUDA GPU (issue #6).

Layer mode: Llama-2-7B/70B linear shapes x token counts M x fp16/bf16, timing dense cuBLAS, torch's
semi-structured sparsity (cuSPARSELt), and ours (Triton, cuSPARSELt with a prepared weight,
decompress-then-cuBLAS). CUDA events around each call, L2 flushed before it, median of ``--reps``.
End-to-end mode (``--e2e``): greedy decode tokens/s of a random-init Llama-2-7B-shape model, dense vs
its Linears swapped for ``SparseLinear`` built from magnitude-pruned weights, one decode step replayed
as a CUDA graph (eager if capture fails; the row says which).

Writes rows to ``benchmarks/results/kernels.json`` (atomically, after every shape, so a run cut off by
a time budget keeps what it measured) and prints a markdown table; ``--dispatch-out`` also writes the
measured dispatch table. Layer mode starts with a ``copy`` row: the device-to-device copy bandwidth of
this run, the ceiling each row's ``gbps`` is compared with. Without CUDA it exits with one line and
measures nothing, unless ``--dry-run``: tiny shapes on the CPU (Triton in its interpreter), to prove
the script before GPU minutes are spent on it.

    python benchmarks/kernels.py                        # everything (long: tunes and times ~1k cases)
    python benchmarks/kernels.py --shapes 7b --m 1,16   # a quick subset
    python benchmarks/kernels.py --e2e --layers 32      # end-to-end decode only
    python benchmarks/kernels.py --dry-run --out /tmp/k.json   # CPU, tiny shapes, numbers meaningless
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmprune.report import git_commit, machine, write_json_atomic  # noqa: E402

SHAPES = {
    "7b": {"q/k/v/o": (4096, 4096), "gate/up": (11008, 4096), "down": (4096, 11008)},
    "70b": {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)},
    "70b-mlp": {"gate/up": (28672, 8192)},
    "tiny": {"tiny": (64, 256)},  # --dry-run
}
E2E_SHAPES = {  # Llama-2-7B, and a tiny one for --dry-run
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                 vocab_size=128, max_position_embeddings=256),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    ap.add_argument("--shapes", type=csv, default=["7b", "70b"], help="model shape sets: 7b,70b")
    ap.add_argument("--m", type=lambda s: [int(t) for t in csv(s)], default=[1, 4, 16, 64, 2048, 8192])
    ap.add_argument("--dtypes", type=csv, default=["fp16", "bf16"])
    ap.add_argument("--formats", type=csv, default=["2:4", "4x4:8"])
    ap.add_argument("--int4", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the int4 decode kernel (dense int4 and 2:4 + int4, g128) at M <= 16")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per case (median reported)")
    ap.add_argument("--e2e", action="store_true", help="run only the end-to-end decode benchmark")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the e2e model (7B has 32)")
    ap.add_argument("--batches", type=lambda s: [int(t) for t in csv(s)], default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernels.json")
    ap.add_argument("--dispatch-out", type=Path, help="also write the measured dispatch table (JSON) here")
    ap.add_argument("--cusparselt", action="store_true", help="also time the opt-in cuSPARSELt path (may poison "
                    "the CUDA context: device_run.py runs it in a process of its own)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new shape is started")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few reps: checks the script only")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.shapes, args.m, args.dtypes, args.reps = ["tiny"], [1, 4], ["fp16"], 3
        args.layers, args.batches, args.new_tokens, args.prompt_len = 2, [1, 2], 6, 4
    args.device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    return args


def time_us(fn: Callable[[], object], reps: int, device: str = "cuda") -> float:
    """Median µs of ``fn`` over ``reps`` calls, each timed by CUDA events after an L2 flush (host clock on CPU)."""
    if device != "cuda":
        return _time_host(fn, reps)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    events = []
    for _ in range(reps):
        flush.zero_()  # cold L2, as for a layer's weights during real decode
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def _time_host(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def copy_row(device: str, sha: str, reps: int) -> dict:
    """Device-to-device copy bandwidth (bytes read + written), the memory ceiling of this run."""
    n = 2**30 if device == "cuda" else 2**22
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), reps, device)
    return {"shape": f"copy {n >> 20} MiB", "kernel": "copy", "format": "copy", "us": round(us, 2),
            "gbps": round(2 * n / us / 1e3, 1), "device": machine(), "commit": sha}


def magnitude_prune(weight: torch.Tensor, pattern: object) -> torch.Tensor:
    return weight * pattern.project(weight.abs())


def layer_cases(args: argparse.Namespace, device: str, sha: str) -> Iterator[list[dict]]:
    """The rows of one shape (all dtypes, M, formats and kernels) at a time."""
    from llmprune.kernels import SparseLinear, cusparselt
    from llmprune.kernels.int4 import int4_mm, quantize
    from llmprune.kernels.dispatch import layout_key
    from llmprune.kernels.linear import _triton
    from llmprune.patterns import parse_pattern

    tk = _triton()
    dev = args.device
    t_start = time.perf_counter()
    for set_name in args.shapes:
        for shape_name, (n, k) in SHAPES[set_name].items():
            if args.deadline is not None and time.perf_counter() - t_start > args.deadline:
                print(f"  deadline reached: {set_name}.{shape_name} and later shapes not measured", file=sys.stderr)
                return
            rows: list[dict] = []
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                torch.manual_seed(0)
                w = torch.randn(n, k, device=dev, dtype=dtype) * 0.02
                mods = {}
                for spec in args.formats:
                    pat = parse_pattern(spec)
                    pruned = magnitude_prune(w, pat)
                    mod = SparseLinear.from_weight(pruned, pat, use_cusparselt=False)
                    use_cslt = (args.cusparselt and mod.layout.fmt == "2:4" and cusparselt.available()
                                and cusparselt.supports((n, k), dtype))
                    mods[spec] = (pruned, mod, cusparselt.CusparseltWeight(pruned) if use_cslt else None)
                semi = _torch_semi(mods["2:4"][0]) if "2:4" in mods and dev == "cuda" else None
                int4 = {"int4": quantize(w, 128, False), "2:4+int4": quantize(w, 128, True)} if args.int4 else {}
                for m in args.m:
                    x = torch.randn(m, k, device=dev, dtype=dtype)
                    es = x.element_size()
                    act_bytes = (m * k + m * n) * es
                    dense_us = time_us(lambda: F.linear(x, w), args.reps, dev)

                    def row(fmt: str, kernel: str, us: float, weight_bytes: int, ok: bool = True) -> dict:
                        return {
                            "shape": f"{set_name}.{shape_name}", "n": n, "k": k, "m": m, "dtype": dname,
                            "format": fmt, "kernel": kernel, "us": round(us, 2), "dense_us": round(dense_us, 2),
                            "speedup": round(dense_us / us, 3), "gbps": round((weight_bytes + act_bytes) / us / 1e3, 1),
                            "tflops": round(2 * m * n * k / us / 1e6, 2), "ok": ok, "device": device, "commit": sha,
                        }  # fmt: skip

                    rows.append(row("dense", "cublas", dense_us, n * k * es))
                    if semi is not None:
                        try:
                            rows.append(row("2:4", "torch_semi", time_us(lambda: F.linear(x, semi), args.reps, dev), n * k * es * 9 // 16))
                        except RuntimeError as e:
                            print(f"torch semi-structured failed at M={m}: {e}", file=sys.stderr)
                    for spec, (pruned, mod, cslt) in mods.items():
                        fmt = layout_key(mod.layout)
                        ref = F.linear(x, pruned)
                        packed = mod.packed
                        paths = {
                            "triton": (lambda: tk.sparse_mm(x, packed), packed.nbytes),
                            "dense": (lambda: F.linear(x, tk.unpack(packed)), packed.nbytes + 2 * n * k * es),
                        }
                        if cslt is not None:
                            paths["cusparselt"] = (lambda: cslt.linear(x), cslt.nbytes)
                        for kernel, (fn, nbytes) in paths.items():
                            ok = torch.allclose(fn().float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
                            rows.append(row(fmt, kernel, time_us(fn, args.reps, dev), nbytes, ok))
                        print(f"  {set_name}.{shape_name} {dname} M={m} {spec}: done", file=sys.stderr)
                    for fmt, q in int4.items() if m <= 16 else ():  # decode only: the kernel's regime
                        ref = F.linear(x, q.dequantize().to(dtype))
                        out = int4_mm(x, q)
                        ok = torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.abs().max().item())
                        rows.append(row(fmt, "triton_int4", time_us(lambda: int4_mm(x, q), args.reps, dev), q.nbytes, ok))
                del mods, semi, w, int4
                if dev == "cuda":
                    torch.cuda.empty_cache()
            yield rows


def _torch_semi(pruned: torch.Tensor) -> torch.Tensor | None:
    """torch's own 2:4 path (cuSPARSELt backend), the baseline issue #6 compares against."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # CUTLASS refuses sm_90
    try:
        return to_sparse_semi_structured(pruned)
    except (RuntimeError, NotImplementedError) as e:
        print(f"torch semi-structured unavailable: {e}", file=sys.stderr)
        return None


def build_llama(layers: int, shape: str = "7b", device: str = "cuda", dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """Random-init Llama model of ``shape`` built directly on ``device`` (seeded, so every variant matches)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**E2E_SHAPES[shape], num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()


@torch.no_grad()
def sparsify(model: torch.nn.Module, spec: str) -> None:
    """Swap every decoder Linear for a SparseLinear of its magnitude-pruned weight (``int4`` / ``2:4+int4``:
    an Int4Linear of it rounded onto an int4 g128 grid)."""
    from llmprune.kernels import SparseLinear
    from llmprune.kernels.int4 import Int4Linear, quantize
    from llmprune.patterns import parse_pattern

    pat = None if spec.endswith("int4") else parse_pattern(spec)
    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in LLAMA_LINEARS:
                lin = getattr(block, name, None)
                if lin is None:
                    continue
                if pat is None:
                    setattr(block, name, Int4Linear(quantize(lin.weight, 128, spec == "2:4+int4"), lin.bias))
                else:
                    setattr(block, name, SparseLinear.from_weight(magnitude_prune(lin.weight, pat), pat, lin.bias))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _static_cache(model: torch.nn.Module, batch: int, length: int):  # noqa: ANN202
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    if "max_batch_size" in params:  # transformers 4.x
        p = next(model.parameters())
        return StaticCache(model.config, max_batch_size=batch, max_cache_len=length, device=p.device, dtype=p.dtype)
    return StaticCache(config=model.config, max_cache_len=length)


@torch.inference_mode()
def greedy_decode(
    model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, graph: bool
) -> tuple[torch.Tensor, float, int, bool]:
    """Greedy-decode ``new_tokens`` after the prompt ``ids``.

    Returns (tokens ``[B, new_tokens]``, seconds of the timed steps, timed steps, CUDA graph used).

    The prompt is prefilled eagerly; each decode step runs one token per sequence against a static KV
    cache, replayed from a CUDA graph when ``graph`` and capture succeeds.
    """
    batch, plen = ids.shape
    cache = _static_cache(model, batch, plen + new_tokens)
    logits = model(ids, past_key_values=cache, cache_position=torch.arange(plen, device=ids.device)).logits
    tok = logits[:, -1:].argmax(-1)
    pos = torch.tensor([plen], device=ids.device)

    def step() -> torch.Tensor:
        return model(tok, past_key_values=cache, cache_position=pos).logits[:, -1:].argmax(-1)

    out = [tok.clone()]
    run = step
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (and kernel tuning) off the capture
                nxt = step()
            torch.cuda.current_stream().wait_stream(side)
            out.append(nxt)
            tok.copy_(nxt)
            pos += 1
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                static_out = step()
            run = lambda: (cuda_graph.replay(), static_out)[1]  # noqa: E731
        except RuntimeError as e:
            print(f"CUDA graph capture failed, decoding eagerly: {e}", file=sys.stderr)
            graph = False
    if ids.is_cuda:
        torch.cuda.synchronize()
    timed = new_tokens - len(out)
    t0 = time.perf_counter()
    while len(out) < new_tokens:
        nxt = run()
        out.append(nxt.clone())
        tok.copy_(nxt)
        pos += 1
    if ids.is_cuda:
        torch.cuda.synchronize()
    return torch.cat(out, 1), time.perf_counter() - t0, timed, graph


def e2e_cases(args: argparse.Namespace, device: str, sha: str) -> Iterator[list[dict]]:
    """The rows of one variant (dense, then each format) at a time."""
    dev, shape = args.device, "tiny" if args.dry_run else "7b"
    dense_tps: dict[int, float] = {}
    for spec in ["dense", *args.formats, *(["int4", "2:4+int4"] if args.int4 else [])]:
        rows = []
        model = build_llama(args.layers, shape, dev, torch.float16 if dev == "cuda" else torch.float32)
        if spec != "dense":
            sparsify(model, spec)
        for batch in args.batches:
            ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), device=dev)
            greedy_decode(model, ids, min(8, args.new_tokens), graph=False)  # tunes the kernels for this batch size
            _, secs, steps, graph = greedy_decode(model, ids, args.new_tokens, graph=dev == "cuda")
            tps = batch * steps / secs
            dense_tps.setdefault(batch, tps)
            us = secs / steps * 1e6
            rows.append({
                "shape": f"llama2-{shape}-shape x{args.layers} layers", "n": model.config.hidden_size,
                "k": model.config.hidden_size, "m": batch, "dtype": "fp16" if dev == "cuda" else "fp32",
                "format": spec, "kernel": "sparselinear" if spec != "dense" else "cublas", "us": round(us, 1),
                "dense_us": round(batch / dense_tps[batch] * 1e6, 1), "speedup": round(tps / dense_tps[batch], 3),
                "tokens_per_s": round(tps, 1), "cuda_graph": graph, "e2e": True, "device": device, "commit": sha,
            })  # fmt: skip
            print(f"  e2e {spec} batch={batch}: {tps:.1f} tokens/s", file=sys.stderr)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
        yield rows


def markdown(rows: list[dict]) -> str:
    cols = ["shape", "m", "dtype", "format", "kernel", "us", "dense_us", "speedup", "gbps", "tflops", "tokens_per_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print("benchmarks/kernels.py: no CUDA device available; nothing measured (this benchmark needs a GPU).")
        return 1
    device, sha = machine(), git_commit()
    old = json.loads(args.out.read_text()) if args.out.is_file() else []
    # a run replaces the rows of its own mode and of the kernels it times; cuSPARSELt rows come from their own run
    mine = (lambda r: bool(r.get("e2e")) == args.e2e and (r.get("kernel") == "cusparselt") == args.cusparselt)
    kept, rows = [r for r in old if not mine(r)], []
    if not args.e2e and not args.cusparselt:
        rows.append(copy_row(args.device, sha, args.reps))
    for chunk in e2e_cases(args, device, sha) if args.e2e else layer_cases(args, device, sha):
        rows += [r for r in chunk if not args.cusparselt or r["kernel"] == "cusparselt"]
        write_json_atomic(args.out, kept + rows)  # after every shape: a run cut off keeps what it measured
    write_json_atomic(args.out, kept + rows)
    print(markdown(rows))
    if args.dispatch_out and not args.e2e:
        from llmprune.kernels.dispatch import DispatchTable

        DispatchTable.from_rows([r for r in rows if r.get("ok", True)]).save(args.dispatch_out)
        print(f"dispatch table written to {args.dispatch_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
