"""Bad input is refused before any work: what needs no model is checked at parse time, what needs only the
model's config and tokenizer right after loading and before calibration. Each pass reports every problem
it finds at once, one line each (an :class:`LLMPruneError` whose message has one line per problem)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from .data import OFFLINE_FILES, hub_unreachable, resolve_data_dir
from .errors import LLMPruneError

_TEXT_PROBE = 8192


def _raise(problems: list[str]) -> None:
    if problems:
        raise LLMPruneError("\n".join(problems))


def text_source(flag: str, name: str, split: str, data_dir: str | None) -> str | None:
    """Why ``name`` (a dataset name or a text file) cannot be read for ``split``, or None."""
    if name in OFFLINE_FILES:
        root = resolve_data_dir(data_dir)
        if root is not None and (root / OFFLINE_FILES[name][split]).is_file():
            return None
        if why := hub_unreachable():
            where = f"{root / OFFLINE_FILES[name][split]} does not exist" if root else "no --data-dir/$LLMPRUNE_DATA"
            return f"{flag} {name}: {where}, and {why}; pass --data-dir DIR laid out like shared/data"
        return None
    path = Path(name).expanduser()
    if not path.is_file():
        return f"{flag} {name}: no such dataset or text file (datasets: {', '.join(OFFLINE_FILES)})"
    if path.suffix != ".gz" and b"\0" in path.read_bytes()[:_TEXT_PROBE]:
        return f"{flag} {name}: not a text file (it holds binary data)"
    return None


def _output(flag: str, value: str | None, overwrite: bool, folder: bool) -> str | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if folder and path.exists() and not path.is_dir():
        return f"{flag} {value} is a file, not a folder; choose another path"
    if not folder and path.is_dir():
        return f"{flag} {value} is a folder; give a file path"
    if folder and path.exists() and not overwrite:
        return f"{flag} {value} exists; pass --overwrite to replace it"
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        return f"{flag} {value}: cannot write in {parent}"
    return None


def model_source(source: str) -> str | None:
    """Why ``--model source`` cannot be a model, without loading it (hub ids pass)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"--model {source}: no config.json in the folder (expected a Hugging Face model folder)"
        return None
    if path.is_file():
        if path.suffix != ".gguf":
            return f"--model {source}: a file, but not a .gguf (give a .gguf file, a model folder or a hub id)"
        return _gguf(path)
    from .models import _looks_like_path

    if _looks_like_path(source):
        return f"--model {source}: model not found (expected a model folder, a .gguf file or a hub id)"
    return None


def _gguf(path: Path) -> str | None:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            return f"--model {path}: not a GGUF file (no GGUF magic number)"
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # memory-maps and checks every tensor's extent against the file
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001 - numpy/struct errors of a damaged file
        return f"--model {path}: truncated or corrupt GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return None


def before_loading(args: Any, config: Any) -> None:
    """The prune command's checks that need no model (run after ``config.plan()``)."""
    problems = [model_source(args.model)] if args.model else []
    problems.append(text_source("--calib", config.calib, "calib", config.data_dir))
    problems += [text_source("--eval", name, "eval", config.data_dir) for name in args.eval]
    if args.eval_windows is not None and args.eval_windows < 1:
        problems.append(f"--eval-windows must be >= 1, got {args.eval_windows} (leave it out for every window)")
    if args.eval_seqlen < 2 or args.eval_batch_size < 1:
        problems.append(f"need --eval-seqlen >= 2 and --eval-batch-size >= 1, got {args.eval_seqlen} and "
                        f"{args.eval_batch_size}")
    problems.append(_output("--report", args.report, True, folder=False))
    problems.append(None if getattr(args, "save_is_own_output", False) else
                    _output("--save", args.save, args.overwrite, folder=True))
    _raise([p for p in problems if p])


def after_loading(model: Any, tokenizer: Any, config: Any, eval_seqlen: int | None) -> None:
    """Checks that need the model's config and tokenizer, before any calibration."""
    from .models import find_blocks
    from .targets import find_targets

    problems = []
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    for flag, n in (("--seqlen", config.seqlen), ("--eval-seqlen", eval_seqlen)):
        if context and n and n > context:
            problems.append(f"{flag} {n} exceeds the model's context of {context} tokens")
    if tokenizer is None:
        problems.append("the model has no tokenizer to read the calibration text with")
    if config.skip:
        prefix, blocks = find_blocks(model)
        names = list(dict.fromkeys(t.name if t.expert is None else t.state_key
                                   for i, b in enumerate(blocks) for t in find_targets(b, f"{prefix}.{i}").values()))
        for glob in config.skip:
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                problems.append(f"--skip {glob!r} matches no target of the model (names look like {names[0]})")
    _raise(problems)
