"""``python -m llmprune``: prune, evaluate, save; ``python -m llmprune inspect DIR``.

Pruning flags are generated from :class:`PruneConfig` and the method config dataclasses, so the CLI,
the API and the help text cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

from .config import PruneConfig
from .errors import LLMPruneError
from .methods import METHODS

log = logging.getLogger("llmprune")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_args(group: argparse._ArgumentGroup, cls: type, prefix: str = "", suppress: bool = False) -> None:
    for f in fields(cls):
        if f.name == "method_options":
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kw: dict[str, Any] = {"help": f.metadata.get("help", ""), "dest": f"{prefix}{f.name}"}
        if suppress:  # method options: None means "not given", so only explicit ones override
            kw["default"] = None
            kw["help"] += f" (default {default})"
        else:
            kw["default"] = default
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction if suppress else "store_true"
        elif isinstance(default, list):
            kw["nargs"] = "+"
        else:
            kw["type"] = float if "float" in str(f.type) else int if "int" in str(f.type) else str
        group.add_argument(_flag(f"{prefix}{f.name}"), **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llmprune",
        description="Prune an LLM layer by layer (ADMM, SparseGPT, Wanda, magnitude), evaluate it, save it. "
        "Also: python -m llmprune inspect DIR.",
    )
    io = p.add_argument_group("model and outputs")
    io.add_argument("--model", help="hub id, local directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    io.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"), help="weights dtype")
    io.add_argument("--save", metavar="DIR", help="write the pruned checkpoint (and run record) to DIR")
    io.add_argument("--format", default="compressed", choices=("compressed", "dense"), help="checkpoint format for --save")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --save DIR")
    io.add_argument("--report", metavar="PATH", help="write the JSON run record to PATH")
    io.add_argument("--quiet", action="store_true", help="no progress bars or logs, only the summary and errors")
    io.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_dataclass_args(p.add_argument_group("pruning"), PruneConfig)
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval", nargs="*", default=[], metavar="DATASET", help="perplexity on wikitext2, ptb, c4 or text files")
    ev.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    ev.add_argument("--eval-windows", type=int, default=None, help="cap the number of evaluation windows")
    ev.add_argument("--eval-batch-size", type=int, default=1, help="windows per evaluation forward pass")
    ev.add_argument("--eval-dense", action="store_true", help="also evaluate the model before pruning")
    for name, method in METHODS.items():
        _add_dataclass_args(p.add_argument_group(f"{name} options"), method.config_cls, prefix=f"{name}_", suppress=True)
    return p


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    cfg = PruneConfig(**{f.name: getattr(args, f.name) for f in fields(PruneConfig) if f.name != "method_options"})
    for name, method in METHODS.items():
        given = {f.name: getattr(args, f"{name}_{f.name}") for f in fields(method.config_cls)}
        given = {k: v for k, v in given.items() if v is not None}
        if given and name != cfg.method:
            raise LLMPruneError(f"{_flag(name + '_' + next(iter(given)))} applies to --method {name}, not {cfg.method}")
        if name == cfg.method:
            cfg.method_options = given
    return cfg


def _check_outputs(args: argparse.Namespace) -> None:
    if args.save and Path(args.save).exists() and not args.overwrite:
        raise LLMPruneError(f"--save {args.save} exists; pass --overwrite to replace it")
    for flag, value in (("--eval-seqlen", args.eval_seqlen), ("--eval-batch-size", args.eval_batch_size)):
        if value < 2 - (flag == "--eval-batch-size"):
            raise LLMPruneError(f"{flag} is too small: {value}")


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The main job: load, (evaluate,) prune, evaluate, save, report."""
    from .api import evaluate, prune
    from .models import default_model, load_model
    from .report import environment, write_json_atomic

    config = config_from_args(args)
    config.validate()
    _check_outputs(args)
    source = args.model or default_model()
    record: dict[str, Any] = {"command": ["python", "-m", "llmprune", *argv], "model": source, "env": environment(),
                              "config": config.to_dict(), "seconds": {}, "ppl": {}}
    sec = record["seconds"]

    if config.stream:
        return _run_streamed(args, config, record)
    t = time.perf_counter()
    model, tokenizer = load_model(source, args.dtype)
    sec["load"] = time.perf_counter() - t
    eval_kw = dict(seqlen=args.eval_seqlen, windows=args.eval_windows, device=config.device, data_dir=config.data_dir,
                   batch_size=args.eval_batch_size, quiet=args.quiet)
    if args.eval and args.eval_dense:
        t = time.perf_counter()
        record["ppl"]["dense"] = evaluate(model, tokenizer, args.eval, **eval_kw)
        sec["eval_dense"] = time.perf_counter() - t

    t = time.perf_counter()
    record["prune"] = prune(model, tokenizer, config, quiet=args.quiet)
    sec["prune"] = time.perf_counter() - t

    if args.eval:
        t = time.perf_counter()
        record["ppl"]["pruned"] = evaluate(model, tokenizer, args.eval, **eval_kw)
        sec["eval"] = time.perf_counter() - t
    if args.save:
        from .export import save_pruned

        t = time.perf_counter()
        pattern = config.resolved_pattern()  # per layer, since OWL allocation varies the sparsity by block
        patterns = {f"{layer['name']}.weight": replace(pattern, sparsity=layer["target"])
                    for layer in record["prune"]["layers"]}
        save_pruned(model, tokenizer, args.save, args.format, patterns, overwrite=args.overwrite,
                    extra_files={"llmprune_run.json": json.dumps(record, indent=2, default=str)})
        sec["save"] = time.perf_counter() - t
    if args.report:
        write_json_atomic(args.report, record)
    return record


def _run_streamed(args: argparse.Namespace, config: PruneConfig, record: dict[str, Any]) -> dict[str, Any]:
    """``--stream``: blocks are read from the checkpoint on disk and written out one at a time."""
    from .stream import prune_checkpoint

    if not args.model or not Path(args.model).is_dir():
        raise LLMPruneError("--stream needs --model DIR (a safetensors checkpoint directory)")
    if not args.save:
        raise LLMPruneError("--stream needs --save DIR: the pruned blocks are written out as they are done")
    if args.eval:
        raise LLMPruneError("--stream does not evaluate (the model is never whole in memory); "
                            "evaluate the saved checkpoint with llmprune.load + llmprune.evaluate")
    t = time.perf_counter()
    record["prune"] = prune_checkpoint(args.model, args.save, config, fmt=args.format, overwrite=args.overwrite,
                                       dtype=args.dtype, quiet=args.quiet, run_record=record)
    record["seconds"]["prune_and_save"] = time.perf_counter() - t
    if args.report:
        from .report import write_json_atomic

        write_json_atomic(args.report, record)
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["inspect"]:
            from .export import inspect_main

            return inspect_main(argv[1:])
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        if args.quiet:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        from .report import print_summary

        print_summary(run(args, argv))
        return 0
    except LLMPruneError as e:
        print(f"llmprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted; no output was written", file=sys.stderr)
        return 130
