"""``python -m llmprune``: prune, evaluate, save; ``python -m llmprune inspect DIR``.

Pruning flags are generated from :class:`PruneConfig` and the method config dataclasses, so the CLI,
the API and the help text cannot drift apart.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from .config import PruneConfig
from .errors import LLMPruneError
from .flags import (SHARED_WITH_PRUNE, Parser, _add_dataclass_args, _own_earlier_output, add_output_args,
                    config_from_args, finetune_config_from_args)
from .methods import METHODS

log = logging.getLogger("llmprune")

def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m llmprune",
        description="Prune an LLM layer by layer (ADMM, SparseGPT, Wanda, magnitude), evaluate it, save it. "
        "Also: python -m llmprune inspect DIR; python -m llmprune generate --model DIR --prompt TEXT.",
    )
    io = p.add_argument_group("model and outputs")
    io.add_argument("--model", help="hub id, local directory or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    add_output_args(io, "pruned")
    io.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_dataclass_args(p.add_argument_group("pruning"), PruneConfig)
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval", nargs="*", default=[], metavar="DATASET", help="perplexity on wikitext2, ptb, c4 or text files")
    ev.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    ev.add_argument("--eval-windows", type=int, default=None, help="cap the number of evaluation windows")
    ev.add_argument("--eval-batch-size", type=int, default=1, help="windows per evaluation forward pass")
    ev.add_argument("--eval-dense", action="store_true", help="also evaluate the model before pruning")
    ev.add_argument("--eval-tasks", default=None, metavar="T1,T2",
                    help="zero-shot accuracy through lm-evaluation-harness, e.g. "
                         "boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa")
    ev.add_argument("--eval-tasks-limit", type=int, default=None, help="cap the documents per task")
    ev.add_argument("--eval-tasks-batch-size", type=int, default=8, help="lm-eval batch size")
    ev.add_argument("--eval-tasks-include", default=None, metavar="DIR", help="a folder of local lm-eval task YAMLs")
    for name, method in METHODS.items():
        _add_dataclass_args(p.add_argument_group(f"{name} options"), method.config_cls, prefix=f"{name}_", suppress=True)
    from .finetune.config import FinetuneConfig

    _add_dataclass_args(p.add_argument_group("fine-tuning straight after pruning (--finetune-tokens N turns it on; "
                                             "the pruner's masks are kept)"), FinetuneConfig, prefix="finetune_",
                        suppress=True, skip=SHARED_WITH_PRUNE)
    return p


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """The main job: load, (evaluate,) prune, save, evaluate, report. Every step is the API's.

    The checkpoint is published before the evaluation, and the work dir removed only after the last
    output (the run record) is written, so nothing finished is lost to a late failure or a kill.
    """
    from .api import evaluate, prune, prune_checkpoint
    from .models import default_model, load_model
    from .tasks import load_tasks, zero_shot
    from .report import environment, write_json_atomic

    from . import checks

    config = config_from_args(args)
    plan = config.plan()  # the one validation of the settings
    ft = finetune_config_from_args(args, config)
    if ft is not None and plan.pattern.quant is not None:
        raise LLMPruneError("--finetune-tokens trains kept weights off the --quant grid; fine-tune first, then quantize")
    args.save_is_own_output = bool(args.save) and _own_earlier_output(args, config)
    checks.before_loading(args, config)  # every model-free problem, at once
    if config.stream:
        _check_streamed(args)
        if ft is not None:
            raise LLMPruneError("--finetune-tokens needs the model in memory, not --stream")
    source = args.model or default_model()
    record: dict[str, Any] = {"command": ["python", "-m", "llmprune", *argv], "model": source, "env": environment(),
                              "config": config.to_dict(), "seconds": {}, "ppl": {}}
    sec = record["seconds"]

    def timed(phase: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = fn(*a, **kw)
        sec[phase] = time.perf_counter() - t
        return out

    def publish() -> None:
        from .export.card import refresh_card

        if args.report:
            write_json_atomic(args.report, record)
        if args.save:
            write_json_atomic(Path(args.save) / "llmprune_run.json", record)
            refresh_card(args.save, record)  # the card's evaluation table is the final one

    if config.stream:
        result = timed("prune_and_save", prune_checkpoint, args.model, args.save, config, fmt=args.format,
                       overwrite=True, dtype=args.dtype, quiet=args.quiet, run_record=record, plan=plan)
        record["prune"] = result.record
        publish()
        return record
    tasks = timed("load_tasks", load_tasks, args.eval_tasks.split(","), args.eval_tasks_include) \
        if args.eval_tasks else None  # before the model: a bad name or unreachable data fails at once
    model, tokenizer = timed("load", load_model, source, args.dtype, args.quiet)
    checks.after_loading(model, tokenizer, config, args.eval_seqlen if args.eval else None)
    eval_kw = dict(seqlen=args.eval_seqlen, windows=args.eval_windows, device=config.device, data_dir=config.data_dir,
                   batch_size=args.eval_batch_size, quiet=args.quiet)
    task_kw = dict(batch_size=args.eval_tasks_batch_size, limit=args.eval_tasks_limit, device=config.device,
                   seed=config.seed, quiet=args.quiet)
    if args.eval and args.eval_dense:
        record["ppl"]["dense"] = timed("eval_dense", evaluate, model, tokenizer, args.eval, **eval_kw)
    if tasks and args.eval_dense:
        record["zero_shot"] = {"dense": timed("tasks_dense", zero_shot, model, tokenizer, tasks, **task_kw)}
    teacher = copy.deepcopy(model) if ft is not None and ft.needs_teacher else None  # the dense weights
    result = timed("prune", prune, model, tokenizer, config, quiet=args.quiet, plan=plan)
    record["prune"] = result.record
    output = result
    if ft is not None:
        from .finetune import finetune

        output = timed("finetune", finetune, model, tokenizer, ft, result.patterns, result.masks, teacher,
                       quiet=args.quiet)
        record["finetune"] = output.record
        del teacher
    if args.save:
        timed("save", output.save, args.save, args.format, overwrite=True,
              extra_files={"llmprune_run.json": json.dumps(record, indent=2, default=str)},
              **({"keep_work_dir": True} if output is result else {}))
    if args.eval or tasks:
        try:
            if args.eval:
                record["ppl"]["pruned"] = timed("eval", evaluate, model, tokenizer, args.eval, **eval_kw)
            if tasks:
                record.setdefault("zero_shot", {})["pruned"] = timed("tasks", zero_shot, model, tokenizer, tasks,
                                                                     **task_kw)
        except (LLMPruneError, KeyboardInterrupt) as e:
            record["eval_error"] = str(e) or type(e).__name__
            publish()  # the saved model stays, with a record that says the evaluation failed
            raise
    publish()
    result.finish()
    if ft is not None and ft.work_dir:
        shutil.rmtree(ft.work_dir, ignore_errors=True)
    return record


def _check_streamed(args: argparse.Namespace) -> None:
    if not args.model or not Path(args.model).is_dir():
        raise LLMPruneError("--stream needs --model DIR (a safetensors checkpoint directory)")
    if not args.save:
        raise LLMPruneError("--stream needs --save DIR: the pruned blocks are written out as they are done")
    if args.eval or args.eval_tasks:
        raise LLMPruneError("--stream does not evaluate (the model is never whole in memory); "
                            "evaluate the saved checkpoint with llmprune.load + llmprune.evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        with logging_redirect_tqdm():  # log lines go through tqdm's writer, so bars stay intact
            return _main(argv)
    except LLMPruneError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"llmprune: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if "--work-dir" in argv:
            work = argv[argv.index("--work-dir") + 1]
            again = " ".join(["python -m llmprune", *argv, *([] if "--resume" in argv else ["--resume"])])
            kept = "the last training checkpoint" if argv[:1] == ["finetune"] else "every finished block"
            print(f"llmprune: interrupted; {kept} is kept in {work}; continue with:\n  {again}", file=sys.stderr)
        else:
            print("llmprune: interrupted; nothing was written (pass --work-dir to make a run resumable)",
                  file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["inspect"]:
        from .export import inspect_main

        return inspect_main(argv[1:])
    if argv[:1] == ["generate"]:
        from .generate import main as generate_main

        return generate_main(argv[1:])
    if argv[:1] == ["finetune"]:
        from .finetune.cli import main as finetune_main
        from .finetune.cli import summary

        if (record := finetune_main(argv[1:])) is not None:  # None: a non-main process of a distributed launch
            print(summary(record), flush=True)
        return 0
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
