"""Command-line flags made from the config dataclasses (so the CLI, the API and the help cannot drift apart),
the argparse that reports errors as one line, and turning parsed flags back into configs."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import PruneConfig
from .errors import LLMPruneError
from .methods import METHODS


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# fine-tuning after pruning takes these from the prune command's own flags
SHARED_WITH_PRUNE = ("device", "data_dir", "seed", "work_dir", "resume")


def _add_dataclass_args(group: argparse._ArgumentGroup, cls: type, prefix: str = "", suppress: bool = False,
                        skip: tuple[str, ...] = ()) -> None:
    for f in fields(cls):
        if f.name == "method_options" or f.name in skip:
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


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text  # nothing to show, or the help already says it (method options: "default X")
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that shows every default in --help and reports a usage error as one ``llmprune: error:`` line."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(formatter_class=_ShowDefaults, **kw)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise LLMPruneError(f"{message} (see {self.prog} --help)")


def add_output_args(io: argparse._ArgumentGroup, what: str) -> None:
    """The flags every command that writes a checkpoint shares."""
    io.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"), help="weights dtype")
    io.add_argument("--save", metavar="DIR", help=f"write the {what} checkpoint (and run record) to DIR")
    io.add_argument("--format", default="compressed", choices=("compressed", "dense"), help="checkpoint format for --save")
    io.add_argument("--overwrite", action="store_true", help="replace an existing --save DIR")
    io.add_argument("--report", metavar="PATH", help="write the JSON run record to PATH")
    io.add_argument("--quiet", action="store_true", help="no progress bars or logs, only the summary and errors")


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


def finetune_config_from_args(args: argparse.Namespace, config: PruneConfig) -> Any:
    """The ``--finetune-*`` flags as a FinetuneConfig, or None without ``--finetune-tokens``."""
    from .finetune.config import FinetuneConfig

    given = {f.name: getattr(args, f"finetune_{f.name}") for f in fields(FinetuneConfig)
             if f.name not in SHARED_WITH_PRUNE and getattr(args, f"finetune_{f.name}") is not None}
    if "tokens" not in given:
        if given:
            raise LLMPruneError(f"{_flag('finetune_' + next(iter(given)))} needs --finetune-tokens N")
        return None
    given.setdefault("train", config.calib)  # the calibration text, never the evaluation text
    work = str(Path(config.work_dir) / "finetune") if config.work_dir else None
    ft = FinetuneConfig(**given, device=config.device, data_dir=config.data_dir, seed=config.seed, work_dir=work,
                        resume=config.resume)
    ft.check()
    return ft


def _own_earlier_output(args: argparse.Namespace, config: PruneConfig) -> bool:
    """``--save DIR`` was written by this very run before it was killed (``--resume`` may replace it)."""
    run = Path(args.save) / "llmprune_run.json"
    try:
        saved = json.loads(run.read_text()).get("config") or {}
    except (OSError, ValueError):
        return False
    this = config.to_dict()
    return config.resume and bool(config.work_dir) and {**saved, "resume": True} == this
