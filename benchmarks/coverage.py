"""Coverage: what llmprune prunes in each architecture, measured on tiny random configs of transformers' own
config classes (the same table ``tests/test_architectures.py`` runs end to end).

Per architecture: the target Linears and expert matrices of one block, the share of the block's weight
matrices they cover, and what stays dense (routers, anything else of >= 1 % of a block) and why.

    python benchmarks/coverage.py        # -> benchmarks/results/coverage.json, and a table
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmprune import LLMPruneError  # noqa: E402
from llmprune.models import find_blocks  # noqa: E402
from llmprune.report import environment, markdown_table, write_json_atomic  # noqa: E402
from llmprune.targets import find_targets, fused_experts, untargeted  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "coverage.json"
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2)
ARCHS: dict[str, dict] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": dict(head_dim=16), "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16, sliding_window=32), "phi3": dict(pad_token_id=0), "olmo2": {}, "granite": {},
    "cohere": {},
    "mixtral": dict(MOE, num_local_experts=4),
    "qwen2_moe": dict(MOE, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(MOE, num_experts=4, moe_intermediate_size=64, head_dim=16),
    "olmoe": dict(MOE, num_experts=4),
    "gpt_oss": dict(MOE, num_local_experts=4, head_dim=16),
    "deepseek_v3": dict(MOE, n_routed_experts=4, num_key_value_heads=4, moe_intermediate_size=64, n_shared_experts=1,
                        first_k_dense_replace=0, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4),
}


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **{**BASE, **ARCHS[arch]})).eval()


def _generic(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name, count=1)


def row(arch: str) -> dict:
    model = tiny(arch)
    prefix, blocks = find_blocks(model)
    block, where = blocks[0], f"{prefix}.0"
    try:
        targets = find_targets(block, where)
    except LLMPruneError as exc:
        return dict(arch=arch, refused=str(exc))
    weights = {n: p for n, p in block.named_parameters() if p.dim() >= 2}
    covered = {t.state_key for t in targets.values()}
    dense = [n for n in weights if f"{where}.{n}" not in covered]
    fused = fused_experts(block, where)
    return dict(arch=arch, linears=sum(t.expert is None for t in targets.values()),
                expert_tensors=sorted(_generic(k) for k in fused),
                expert_layout=sorted({"[E, in, out]" if t else "[E, out, in]" for _, t in fused.values()}),
                experts=sum(t.expert is not None for t in targets.values()),
                share=round(sum(t.weight.numel() for t in targets.values()) / sum(p.numel() for p in weights.values()), 4),
                dense=[_generic(f"{where}.{n}") for n in dense],
                listed=[_generic(d["name"]) for d in untargeted(block, where)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    env = environment()
    rows = [row(a) for a in ARCHS]
    write_json_atomic(args.out, {"benchmark": "benchmarks/coverage.py", "command": "python benchmarks/coverage.py",
                                 "env": env, "rows": rows})
    print(markdown_table(["arch", "Linears", "expert matrices", "share of block weights", "dense"],
                         [[r["arch"], r.get("linears", "-"), r.get("experts", "-"), r.get("share", "-"),
                           r.get("refused") or ", ".join(r["dense"]) or "-"] for r in rows]))
    print(json.dumps({"written": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
