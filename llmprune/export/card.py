"""The model card (README.md, Hugging Face convention) every saved checkpoint carries: what was done to the
model, what it measured, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..patterns import Pattern


def _base_model(source: str) -> str | None:
    """A hub id (``org/name``) the model came from, if the run record names one."""
    parts = source.split("/")
    return source if len(parts) == 2 and not source.startswith((".", "/", "~")) and not source.endswith(".gguf") else None


def model_card(fmt: str, targets: dict[str, Pattern], sparsity: float, record: dict[str, Any] | None,
               license: str | None = None) -> str:
    """README.md text for a checkpoint of ``targets`` (name -> pattern) in format ``fmt``; ``record`` is the
    run record (CLI or API), when there is one."""
    record = record or {}
    cfg = record.get("config", {})
    patterns = sorted({(str(p) if p.structured else f"{p.sparsity:.0%} unstructured")
                       + ("" if p.quant is None else f" + {p.quant}") for p in targets.values()})
    quantized = any(p.quant is not None for p in targets.values())
    front = ["---", "library_name: transformers", "tags:", "- llmprune", "- pruned", "- sparse",
             *(["- quantized"] if quantized else []), *[f"- {p.replace(' + ', '-').replace(' ', '-')}" for p in patterns]]
    if base := _base_model(str(record.get("model", ""))):
        front += [f"base_model: {base}"]
    if license:
        front += [f"license: {license}"]
    lines = [*front, "---", "", "# Pruned with llmprune", ""]
    what = f"{len(targets)} Linear weights pruned to {', '.join(patterns) or 'no pattern'}"
    if cfg:
        what += (f" with `{cfg.get('method')}`, calibrated on {cfg.get('nsamples')} windows of {cfg.get('seqlen')} "
                 f"tokens of `{cfg.get('calib')}` (seed {cfg.get('seed')})")
    lines += [f"- Model: `{record.get('model', 'unknown')}`", f"- {what}.",
              f"- Measured sparsity of the pruned weights: {sparsity:.4f}; format `{fmt}`."]
    if "finetune" in record:
        ft = record["finetune"]
        lines.append(f"- Fine-tuned afterwards: mode `{ft.get('config', {}).get('mode')}`, {ft.get('tokens')} tokens.")
    ppl = record.get("ppl", {})
    if ppl.get("pruned"):
        lines += ["", "| perplexity | dense | pruned |", "|---|---|---|"]
        dense = ppl.get("dense", {})
        lines += [f"| {name} | {dense[name]:.4g} | {value:.4g} |" if name in dense else f"| {name} | – | {value:.4g} |"
                  for name, value in ppl["pruned"].items()]
    zs = record.get("zero_shot", {})
    if zs.get("pruned"):
        lines += ["", "| zero-shot (lm-eval, acc_norm or acc) | dense | pruned | documents |", "|---|---|---|---|"]
        dense = zs.get("dense", {})

        def acc(m: dict[str, float] | None) -> str:
            return "–" if m is None else f"{m.get('acc_norm', m.get('acc')):.4f}"

        lines += [f"| {name} | {acc(dense.get(name))} | {acc(m)} | {m.get('docs')} |" for name, m in zs["pruned"].items()]
    if record.get("eval_error"):
        lines += ["", f"The evaluation failed: {record['eval_error']}"]
    lines += ["", "## Loading", "", "```python", "import llmprune", "model = llmprune.load(\"PATH\")  # bit-exact weights",
              "```", ""]
    if fmt == "dense":
        lines += ["The dense format is a plain transformers checkpoint (zeros stored): "
                  "`AutoModelForCausalLM.from_pretrained(\"PATH\")` and vLLM read it as is.", ""]
    else:
        lines += ["The compressed format stores only the kept weights and their positions "
                  "(`llmprune/export/FORMAT.md`). After `import llmprune`, plain "
                  "`AutoModelForCausalLM.from_pretrained(\"PATH\")` decodes it too (a dense model; without llmprune it "
                  "fails on a size mismatch rather than load random weights); for tools "
                  "without llmprune (vLLM, llm-compressor) save with `--format dense`.", ""]
    return "\n".join(lines)


def refresh_card(path: str | Path, record: dict[str, Any]) -> None:
    """Rewrite a saved checkpoint's README.md from its final run record (e.g. after the evaluation)."""
    from ..report import write_atomic
    from . import schema

    sc = json.loads((Path(path) / "config.json").read_text()).get(schema.CONFIG_KEY)
    fmt, targets = schema.declared(sc)
    text = model_card(fmt, targets, float(sc.get("global_sparsity", 0.0)), record)
    write_atomic(Path(path) / "README.md", lambda tmp: Path(tmp).write_text(text))
