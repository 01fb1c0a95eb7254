"""CPU speed of the packed kernels against torch's dense and weight-only quantized Linears, and of whole-model
greedy decoding against transformers and llama.cpp.

``--part linear``: one Linear at Llama-2-7B (MLP, attention) and SmolLM2 shapes, M tokens, 1 and 2 threads;
dense fp32 / bf16 / fp16 (``F.linear``), torch's weight-only int8 (``_weight_int8pack_mm``) and int4 g128
(``_weight_int4pack_mm_for_cpu``), and ours (``llmprune.kernels.cpu``) for 2:4, 4x4:8 and 50 % / 70 %
unstructured (bitmask) with bf16 values, 2:4 + int4 g128 and int4 g128 (int8-rounded tokens by default, ``fp32
act`` without), 4x4:8 + int4 and 50 % + int4. Median of ``--reps`` calls after warm-up, each on a copy of the
weight not in the cache (``cpu_linear.py``: copies fill twice the L3); every output is first checked against the
dense matmul of the decompressed weight (``ok``: within 2 % of the output's range). GB/s = weight bytes / time,
beside the copy bandwidth.

``--part e2e``: greedy decode, batch 1, ``--new-tokens`` after a short prompt (``llmprune.generate.greedy``:
the lean loop, or ``--loop transformers``; ``--lm-head int8``), for the bundled SmolLM2 and a
Llama-3.2-1B-shaped model with random weights, and ``smollm2-depth-tiny-width`` (SmolLM2's 30 layers at
width 64: what a loop costs a token when the weights cost nothing); every decoder Linear magnitude-pruned
and packed in memory (speed only: the weights' quality is irrelevant).

``--part quality``: what int8-rounded tokens and an int8 head cost: teacher-forced perplexity of SmolLM2 with
int4 g128 weights through the lean loop, token by token, on ``--windows`` WikiText-2 test windows.

``--part llamacpp``: the bundled SmolLM2 Q4_1 GGUF through llama-cpp-python (optional; build it with the
machine's compiler), same prompt, threads and token count.

    python benchmarks/cpu.py --part linear
    python benchmarks/cpu.py --part e2e --models smollm2 --new-tokens 128 [--lm-head int8]
    python benchmarks/cpu.py --part llamacpp --threads 2

Rows are kept per (part, shape/model, M, threads, kind, loop, head, machine); timing on a shared machine is
noisy: run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_linear import SHAPES, copy_gbps, l3_bytes, linear_rows, pattern_of  # noqa: E402

from llmprune.kernels import SparseLinear, cpu  # noqa: E402
from llmprune.kernels.int4 import Int4Linear, quantize  # noqa: E402
from llmprune.report import environment, markdown_table, write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cpu.json"
PROMPT = "The capital of France is"
# SmolLM2's depth and head count at a width where the weights cost nothing: the per-token overhead of a loop
TINY_WIDTH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
                  num_key_value_heads=1, vocab_size=256, head_dim=16)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64)


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni", "amx_bf16")
            if f in flags]
    return {"cpu": model, "simd": simd, "kernel_isa": cpu.build.isa(), "l3_mb": l3_bytes() >> 20}


def swap(model: torch.nn.Module, kind: str) -> None:
    """Replace every decoder Linear by its packed form (magnitude-pruned) or a torch int8 weight-only one."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and ".layers." in name]
    for name, lin in targets:
        w = lin.weight.detach().float()
        if kind == "torch int8 w-only":
            new = Int8WeightOnly(w)
        elif kind.endswith("+int4"):
            sparse = {"dense": False, "2:4": True, "4x4:8": "4x4:8", "50%": "unstructured"}[kind.removesuffix("+int4")]
            new = Int4Linear(quantize(w, 128, sparse=sparse, symmetric=False))
        else:
            keep = pattern_of(kind).project(w.abs())
            new = SparseLinear.from_weight((w * keep).to(lin.weight.dtype), pattern_of(kind), mask=keep)
        model.set_submodule(name, new)


class Int8WeightOnly(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        self.register_buffer("q", (w / scale[:, None]).round().to(torch.int8))
        self.register_buffer("s", scale.bfloat16())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch._weight_int8pack_mm(flat.bfloat16(), self.q, self.s).to(x.dtype).reshape(*x.shape[:-1], -1)


def build_model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "smollm2":
        from llmprune.models import default_model, load_model

        model, tokenizer = load_model(default_model(), quiet=True)
        return model, tokenizer(PROMPT, return_tensors="pt").input_ids
    torch.manual_seed(0)
    shape = {"llama-1b-shape": LLAMA_1B, "smollm2-depth-tiny-width": TINY_WIDTH}[name]
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape)).eval()
    return model, torch.randint(0, min(1000, shape["vocab_size"]), (1, 6))


def e2e_rows(args: argparse.Namespace, env: dict) -> list[dict]:
    import copy

    from llmprune.generate import greedy

    rows = []
    torch.set_num_threads(int(args.threads.split(",")[-1]))
    for name in args.models.split(","):
        base, ids = build_model(name)
        for kind in args.kinds.split(","):
            model = copy.deepcopy(base)
            if kind == "dense bf16" or kind in ("2:4", "4x4:8", "50%", "70%"):
                model = model.bfloat16()
            if not kind.startswith("dense"):
                swap(model, kind)
            opts = dict(lean=args.loop == "lean", lm_head=args.lm_head)
            greedy(model, ids, 4, **opts)  # warm-up: first-use costs out of the timing
            runs = [greedy(model, ids, args.new_tokens, **opts) for _ in range(args.e2e_reps)]
            tps = statistics.median(r.decode_tokens_per_s for r in runs)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            rows.append(dict(part="e2e", model=name, kind=kind, loop=runs[0].loop, lm_head=args.lm_head,
                             new_tokens=args.new_tokens,
                             threads=torch.get_num_threads(), decode_tokens_per_s=round(tps, 2),
                             prefill_tokens_per_s=round(statistics.median(r.prefill_tokens_per_s for r in runs), 1),
                             peak_rss_gb=round(rss, 2), **env))
            print(f"{name} {kind} ({runs[0].loop} loop, {args.lm_head} head): {tps:.1f} tokens/s "
                  f"(peak RSS so far {rss:.1f} GB)", flush=True)
            del model
        del base
    return rows


def quality_rows(args: argparse.Namespace, env: dict) -> list[dict]:
    """What int8-rounded tokens and an int8 head cost in quality: teacher-forced perplexity of SmolLM2 with every
    decoder Linear int4 g128 (round to nearest), one token a step through the lean loop, on WikiText-2 test."""
    import math

    from llmprune.lean import lean_decoder
    from llmprune.models import default_model, load_model

    model, tokenizer = load_model(default_model(), quiet=True)
    swap(model, "dense+int4")
    text = (Path(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw").read_text()[: 200 * args.window]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rows = []
    for act_int8 in (True, False):
        for head in ("dense", "int8"):
            nll, count = 0.0, 0
            for w in range(args.windows):
                seg = ids[w * args.window:(w + 1) * args.window]
                dec = lean_decoder(model, args.window, head, act_int8)
                for i in range(len(seg) - 1):
                    logits = dec.step(seg[i:i + 1]).float()
                    nll += float(torch.logsumexp(logits, -1) - logits[seg[i + 1]])
                    count += 1
            ppl = math.exp(nll / count)
            rows.append(dict(part="quality", model="smollm2", kind="int4 g128 rtn", loop="lean", lm_head=head,
                             act="int8 per 32" if act_int8 else "fp32", ppl=round(ppl, 4), tokens=count,
                             window=args.window, **env))
            print(f"act {'int8' if act_int8 else 'fp32'} head {head}: ppl {ppl:.3f} over {count} tokens", flush=True)
    return rows


def llamacpp_rows(args: argparse.Namespace, env: dict) -> list[dict]:
    """The bundled SmolLM2 Q4_1 GGUF through llama.cpp (``pip install llama-cpp-python``): same prompt, threads
    and token count as ``--part e2e``, greedy (argmax of the last logits), decode timed after the first token."""
    import numpy as np
    import llama_cpp

    from llmprune.models import default_model

    threads = int(args.threads.split(",")[-1])
    llm = llama_cpp.Llama(model_path=default_model(), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                          verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    rates = []
    for _ in range(args.e2e_reps):
        llm.reset()
        llm.eval(prompt)
        start = None
        for i in range(args.new_tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
            if i == 1:
                start = time.perf_counter()
            llm.eval([int(np.argmax(logits))])
        rates.append((args.new_tokens - 1) / (time.perf_counter() - start))
    tps = statistics.median(rates)
    print(f"smollm2 llama.cpp Q4_1: {tps:.1f} tokens/s", flush=True)
    build = llama_cpp.llama_print_system_info().decode()
    return [dict(part="e2e", model="smollm2", kind="llama.cpp Q4_1 gguf", loop="llama.cpp", lm_head="gguf",
                 new_tokens=args.new_tokens, threads=threads, decode_tokens_per_s=round(tps, 2),
                 llama_cpp=llama_cpp.__version__, llama_cpp_build=build.strip(), **env)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("linear", "e2e", "llamacpp", "quality"), default="linear")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--m", default="1,4,16,256")
    p.add_argument("--threads", default="1,2", help="linear: each; e2e: the last")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--models", default="smollm2,llama-1b-shape")
    p.add_argument("--kinds", default="dense fp32,dense bf16,torch int8 w-only,2:4,4x4:8,50%,2:4+int4,4x4:8+int4,"
                                      "50%+int4,dense+int4")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--e2e-reps", type=int, default=3)
    p.add_argument("--loop", choices=("lean", "transformers"), default="lean", help="e2e: llmprune's decode loop or "
                   "transformers' forward")
    p.add_argument("--lm-head", choices=("dense", "int8"), default="dense", help="e2e: the output head's storage")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"),
                   help="quality: the folder holding wikitext-2-raw/")
    p.add_argument("--windows", type=int, default=6, help="quality: windows of --window tokens")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if not cpu.available():
        print("the C++ CPU kernels are not built (see the warning above)", file=sys.stderr)
        return 1
    meta = environment()
    env = dict(machine=meta["machine"], commit=meta["commit"], torch=meta["torch"], **cpu_info())
    command = " ".join(["python", *sys.argv])
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if args.part == "linear":
        data["copy_gbps"] = {env["cpu"]: copy_gbps()}
        new = linear_rows(args, env)
    elif args.part == "e2e":
        new = e2e_rows(args, env)
    elif args.part == "quality":
        new = quality_rows(args, env)
    else:
        new = llamacpp_rows(args, env)
    key = ("part", "shape", "model", "m", "threads", "kind", "loop", "lm_head", "act", "cpu")
    fresh = {tuple(r.get(c) for c in key) for r in new}
    data["rows"] = [r for r in data["rows"] if tuple(r.get(c) for c in key) not in fresh] + new
    for r in new:
        r["command"] = command
    write_json_atomic(out, {"benchmark": "benchmarks/cpu.py", **data})
    if args.part == "linear":
        print(markdown_table(["shape", "M", "threads", "kind", "ms", "GB/s", "× bf16", "ok"],
                             [[r["shape"], r["m"], r["threads"], r["kind"], r["ms"], r["gbps"], r["vs_bf16"], r["ok"]]
                              for r in new]))
    elif args.part == "quality":
        print(markdown_table(["model", "weights", "tokens", "head", "perplexity", "scored tokens"],
                             [[r["model"], r["kind"], r["act"], r["lm_head"], r["ppl"], r["tokens"]] for r in new]))
    else:
        print(markdown_table(["model", "kind", "loop", "head", "decode tokens/s", "prefill tokens/s", "peak RSS GB"],
                             [[r["model"], r["kind"], r["loop"], r["lm_head"], r["decode_tokens_per_s"],
                               r.get("prefill_tokens_per_s", ""), r.get("peak_rss_gb", "")] for r in new]))
    print(json.dumps({"written": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
