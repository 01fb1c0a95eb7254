"""``python -m llmprune finetune``: load a pruned checkpoint (or a dense model and a pattern), fine-tune,
save, report. Flags are generated from :class:`FinetuneConfig`, as the prune command's are from
``PruneConfig``; the loop itself is the API's (:func:`llmprune.finetune`)."""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import LLMPruneError
from .config import FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    from ..flags import Parser, _add_dataclass_args, add_output_args

    p = Parser(prog="python -m llmprune finetune",
                                description="Recover a pruned model by training, keeping its pattern exact.")
    io = p.add_argument_group("model and outputs")
    io.add_argument("--model", required=True, help="llmprune checkpoint (its patterns and masks are kept) or a "
                                                   "dense model (hub id, dir, .gguf) with --pattern")
    io.add_argument("--pattern", default=None, help="for a dense --model: the pattern of every decoder Linear")
    io.add_argument("--sparsity", type=float, default=None, help="for a dense --model with --pattern unstructured")
    io.add_argument("--teacher", default=None, help="dense teacher for --kd / --squarehead (default with a dense "
                                                     "--model: its own weights before training)")
    add_output_args(io, "fine-tuned")
    _add_dataclass_args(p.add_argument_group("fine-tuning"), FinetuneConfig)
    return p


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict, dict | None, Any]:
    """(model, tokenizer, patterns, masks, teacher) for ``args``."""
    from transformers import AutoTokenizer

    from ..export import Checkpoint, load
    from ..models import find_blocks, load_model
    from ..patterns import parse_pattern
    from ..targets import find_targets

    path = Path(args.model).expanduser()
    if (path / "config.json").is_file() and "sparsity_config" in json.loads((path / "config.json").read_text()):
        if args.pattern:
            raise LLMPruneError(f"{path} is a pruned checkpoint: its patterns are kept, so drop --pattern")
        ckpt = Checkpoint(path)
        model = load(path, dtype=None if args.dtype == "auto" else args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        patterns, masks, teacher = dict(ckpt.targets), {k: ckpt.mask(k) for k in ckpt.targets}, None
    else:
        if not args.pattern:
            raise LLMPruneError(f"{args.model} is not an llmprune checkpoint: give --pattern for its Linears")
        pattern = parse_pattern(args.pattern, args.sparsity)
        model, tokenizer = load_model(args.model, args.dtype)
        prefix, blocks = find_blocks(model)
        targets = [t for i, b in enumerate(blocks) for t in find_targets(b, f"{prefix}.{i}").values()]
        for t in targets:
            pattern.check_shape(t.weight.shape, t.name)
        patterns = {t.key: pattern for t in targets}
        masks, teacher = None, None
        if args.kd or args.squarehead:
            teacher = copy.deepcopy(model) if not args.teacher else None
    if args.teacher:
        teacher = load_model(args.teacher, args.dtype)[0]
    return model, tokenizer, patterns, masks, teacher


def main(argv: list[str]) -> dict[str, Any] | None:
    """Parse, fine-tune, save; returns the run record (the caller prints it), or None on the processes of a
    distributed launch other than the main one, which alone writes the outputs."""
    from accelerate import PartialState

    from .. import finetune
    from ..report import environment, write_json_atomic

    args = build_parser().parse_args(argv)
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    config.check()
    if args.save and Path(args.save).exists() and not args.overwrite:
        raise LLMPruneError(f"--save {args.save} exists; pass --overwrite to replace it")
    record: dict[str, Any] = {"command": ["python", "-m", "llmprune", "finetune", *argv], "env": environment(),
                              "seconds": {}}
    t = time.perf_counter()
    model, tokenizer, patterns, masks, teacher = _load(args)
    record["seconds"]["load"] = time.perf_counter() - t
    t = time.perf_counter()
    result = finetune(model, tokenizer, config, patterns, masks, teacher, quiet=args.quiet)
    record["seconds"]["finetune"] = time.perf_counter() - t
    record["finetune"] = result.record
    if not PartialState().is_main_process:
        return None
    if args.save:
        result.save(args.save, args.format, overwrite=args.overwrite,
                    extra_files={"llmprune_run.json": json.dumps(record, indent=2, default=str)})
    if args.report:
        write_json_atomic(args.report, record)
    return record


def summary(record: dict[str, Any]) -> str:
    from ..report import markdown_table

    ft = record["finetune"]
    val = ft["val"]
    rows = [["mode", ft["config"]["mode"]], ["steps", len(ft["loss"])], ["tokens", ft["tokens"]],
            ["validation loss first -> last", f"{val[0]['loss']:.4f} -> {val[-1]['loss']:.4f}" if val else "-"],
            *[[f"seconds {k}", round(v, 2)] for k, v in record["seconds"].items()]]
    return markdown_table(["", "value"], rows)
