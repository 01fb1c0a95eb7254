"""``benchmarks/cpu.py --part linear``: one Linear, ours against torch's dense and weight-only quantized ones.

Every candidate's weight is copied until the copies fill twice the L3 (this Xeon reports 480 MB) and the calls
cycle through them, so each call streams its weight from DRAM as a model's decode step does; one weight
repeated would be served from the cache (it was, before this file: the 7B MLP fits in 480 MB several times).
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune.kernels import cpu, layout_for, pack  # noqa: E402
from llmprune.kernels.int4 import quantize  # noqa: E402
from llmprune.patterns import Pattern, parse_pattern  # noqa: E402

SHAPES = {"7b-mlp-up": (11008, 4096), "7b-mlp-down": (4096, 11008), "7b-attn": (4096, 4096),
          "smollm2-mlp-up": (1536, 576), "smollm2-mlp-down": (576, 1536)}


def l3_bytes() -> int:
    """The last-level cache of CPU 0 (sysfs), 32 MB where it can't be read."""
    sizes = [Path(p).read_text().strip() for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    parsed = [int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s) for s in sizes if s]
    return max(parsed, default=32 << 20)


def median_ms(fn, reps: int) -> float:  # noqa: ANN001
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def copy_gbps() -> float:
    src = torch.empty(max(256 << 20, 2 * l3_bytes()) // 4, dtype=torch.float32).fill_(1)  # past the L3
    dst = torch.empty_like(src)
    return round(2 * src.nbytes / median_ms(lambda: dst.copy_(src), 5) / 1e6, 1)


def candidates(w: torch.Tensor) -> dict:
    """kind -> (call(x_bf16_or_f32, state) -> y, state (the weight's tensors), weight bytes, reference fp32)."""
    n, k = w.shape
    out = {}
    for name, dt in (("dense fp32", torch.float32), ("dense bf16", torch.bfloat16), ("dense fp16", torch.float16)):
        wd = w.to(dt)
        out[name] = (lambda x, wd: F.linear(x.to(wd.dtype), wd), wd, wd.nbytes, wd.float())
    scale8 = w.abs().amax(1).clamp_min(1e-8) / 127
    q8 = (w / scale8[:, None]).round().to(torch.int8)
    s8 = scale8.bfloat16()
    out["torch int8 w-only"] = (lambda x, st: torch._weight_int8pack_mm(x.bfloat16(), *st), (q8, s8),
                                q8.nbytes + s8.nbytes, q8.float() * s8.float()[:, None])
    if k % 128:  # torch's int4 op needs whole groups
        return out | ours(w)
    w4 = quantize(w, 128, sparse=False, symmetric=False)
    codes = torch.stack([w4.codes & 15, w4.codes >> 4], -1).flatten(1)[:, :k].int()
    sz = torch.stack([w4.scale.float(), (8 - w4.zero.float()) * w4.scale.float()], -1)  # torch: (q - 8) * s + z
    sz = sz.transpose(0, 1).contiguous().bfloat16()
    packed4 = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    ref4 = ((codes.float() - 8) * sz.float().transpose(0, 1)[..., 0].repeat_interleave(128, 1)[:, :k]
            + sz.float().transpose(0, 1)[..., 1].repeat_interleave(128, 1)[:, :k])
    out["torch int4 w-only g128"] = (lambda x, st: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), st[0], 128, st[1]),
                                     (packed4, sz), packed4.nbytes + sz.nbytes, ref4)
    return out | ours(w)


def pattern_of(kind: str) -> Pattern:
    """A sparsity kind of the tables: ``2:4``, ``4x4:8`` or ``50%`` / ``70%`` (unstructured, per row)."""
    return parse_pattern("unstructured", int(kind[:-1]) / 100) if kind.endswith("%") else parse_pattern(kind)


def ours(w: torch.Tensor) -> dict:
    out = {}
    for spec in ("2:4", "4x4:8", "50%", "70%"):
        pattern = pattern_of(spec)
        keep = pattern.project(w.abs())
        pw = pack((w * keep).bfloat16(), layout_for(pattern), keep)
        out[f"ours {spec} bf16"] = (cpu.linear, pw, pw.nbytes, (w * keep).bfloat16().float())
    for name, sparse in (("ours 2:4+int4 g128", True), ("ours int4 g128", False)):
        q = quantize(w, 128, sparse=sparse)
        out[name] = (cpu.linear, q, q.nbytes, q.dequantize())  # int8-rounded tokens (M <= 16)
        out[name + " fp32 act"] = (lambda x, q: cpu.linear(x, q, act_int8=False), q, q.nbytes, q.dequantize())
    for name, sparse in (("ours 4x4:8+int4 g128", "4x4:8"), ("ours 50%+int4 g128", "unstructured")):
        q = quantize(w, 128, sparse=sparse)  # no integer kernel yet: the float rows on int8-rounded tokens
        out[name] = (cpu.linear, q, q.nbytes, q.dequantize())
    return out


def linear_rows(args, env: dict) -> list[dict]:  # noqa: ANN001
    """Rows per shape, kind, threads and M; a kind's copies live only while it is measured (they fill 2x L3)."""
    rows, cache = [], l3_bytes()
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
        xs = {m: torch.randn(m, k, generator=torch.Generator().manual_seed(1)).bfloat16()
              for m in (int(v) for v in args.m.split(","))}
        cands, first = candidates(w), len(rows)
        for kind in list(cands):
            call, state, nbytes, ref = cands.pop(kind)
            copies = [state] + [copy.deepcopy(state) for _ in range(math.ceil(2 * cache / nbytes) - 1)]
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                for m, x in xs.items():
                    want = x.float() @ ref.T
                    got = call(x, state).float()
                    ok = bool(((got - want).abs().max() <= 2e-2 * want.abs().max()).item())
                    turn = itertools.cycle(copies)  # each call a weight not in the cache
                    ms = median_ms(lambda call=call, turn=turn: call(x, next(turn)),
                                   args.reps if m <= 16 else max(3, args.reps // 6))
                    rows.append(dict(part="linear", shape=shape, n=n, k=k, m=m, threads=threads, kind=kind,
                                     ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1), weight_bytes=nbytes, ok=ok,
                                     working_set_mb=round(nbytes * len(copies) / 2**20), **env))
                    print(f"{shape} M={m} T={threads} {kind}: {ms:.3f} ms ok={ok}", flush=True)
            del copies, state
        base = {(r["threads"], r["m"]): r["ms"] for r in rows[first:] if r["kind"] == "dense bf16"}
        for r in rows[first:]:
            r["vs_bf16"] = round(base[(r["threads"], r["m"])] / r["ms"], 3)
    return rows


if __name__ == "__main__":  # the same as ``benchmarks/cpu.py --part linear``
    import cpu as cpu_benchmark

    sys.exit(cpu_benchmark.main(["--part", "linear", *sys.argv[1:]]))
