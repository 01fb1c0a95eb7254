"""Calibration windows and evaluation text.

Offline, named datasets are read from a folder laid out like ``shared/data`` (``--data-dir`` or
``$LLMPRUNE_DATA``); online they come through ``datasets`` with the peers' choices (WikiText-2 raw,
C4 shard 0, PTB). Calibration follows SparseGPT/Wanda: the text is tokenized once and ``nsamples``
windows start at positions drawn uniformly with ``random.Random(seed)``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import socket
from pathlib import Path
from typing import Any

import torch

from .errors import LLMPruneError

log = logging.getLogger(__name__)

# name -> split -> file under the data dir. WikiText-2's train split is not shipped offline, so offline
# calibration reads the valid split (the convention of shared/data/README.md).
OFFLINE_FILES = {
    "wikitext2": {"calib": "wikitext-2-raw/wiki.valid.raw", "eval": "wikitext-2-raw/wiki.test.raw"},
    "ptb": {"calib": "ptb/ptb.train.txt", "eval": "ptb/ptb.test.txt"},
    "c4": {"calib": "c4/c4-train.00000-of-01024.json.gz", "eval": "c4/c4-validation.00000-of-00008.json.gz"},
}
C4_EVAL_DOCS = 1100  # the peers evaluate C4 on the first 1100 validation documents


def hub_unreachable() -> str | None:
    """Why named datasets cannot come from the Hugging Face hub now (offline mode, no network), or None.

    Asked before ``datasets`` is, which would otherwise retry for minutes and print a page of warnings."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"offline mode is on ({var})"
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        return "the Hugging Face hub cannot be reached"
    return None


def resolve_data_dir(data_dir: str | None) -> Path | None:
    d = data_dir or os.environ.get("LLMPRUNE_DATA")
    return Path(d).expanduser() if d else None


def load_text(name: str, split: str, data_dir: str | None = None) -> str:
    """The raw text of ``name`` (wikitext2, ptb, c4 or a file path) for ``split`` ('calib' | 'eval')."""
    if name not in OFFLINE_FILES:
        return _read_file(Path(name).expanduser())
    root = resolve_data_dir(data_dir)
    if root is not None and (root / OFFLINE_FILES[name][split]).is_file():
        return _read_file(root / OFFLINE_FILES[name][split])
    where = f"{root / OFFLINE_FILES[name][split]} does not exist" if root else "no --data-dir/$LLMPRUNE_DATA set"
    if why := hub_unreachable():
        raise LLMPruneError(f"cannot load dataset {name!r} ({split}): {where}, and {why}")
    try:
        return _load_online(name, split)
    except Exception as e:  # datasets raises many types offline (ConnectionError, FileNotFoundError, ...)
        raise LLMPruneError(f"cannot load dataset {name!r} ({split}): {where}, and online loading failed ({type(e).__name__})") from e


def _read_file(path: Path) -> str:
    if not path.is_file():
        looks_named = not path.suffix and os.sep not in str(path)
        hint = f"; known datasets: {', '.join(OFFLINE_FILES)}" if looks_named else ""
        raise LLMPruneError(f"no such dataset or text file: {path}{hint}")
    if path.name.startswith("ptb."):  # the online loader's protocol: stripped sentences joined by single spaces
        text = " ".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    elif path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        text = "\n\n".join(docs[:C4_EVAL_DOCS] if "validation" in path.name else docs)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LLMPruneError(f"text file {path} is empty")
    return text


def _load_online(name: str, split: str) -> str:
    from datasets import load_dataset

    if name == "wikitext2":
        ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
        return "\n\n".join(ds["text"])
    if name == "ptb":
        ds = load_dataset("ptb_text_only", "penn_treebank", split="train" if split == "calib" else "test")
        return " ".join(ds["sentence"])
    files = OFFLINE_FILES["c4"][split].removeprefix("c4/")
    ds = load_dataset("allenai/c4", data_files={"x": f"en/{files}"}, split="x")
    return "\n\n".join(ds["text"][:C4_EVAL_DOCS] if split == "eval" else ds["text"][:20000])


def wants_bos(tokenizer: Any) -> bool:
    """True for tokenizers that put BOS in front of every sequence (Gemma, Llama-2)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text once, without special tokens (windows get BOS separately)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    tokenizer: Any, name: str, nsamples: int, seqlen: int, seed: int = 0, data_dir: str | None = None
) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows drawn uniformly from the calibration text."""
    ids = tokenize(tokenizer, load_text(name, "calib", data_dir))
    bos = [tokenizer.bos_token_id] if wants_bos(tokenizer) else []
    span = seqlen - len(bos)
    if len(ids) <= span:
        raise LLMPruneError(f"calibration text {name!r} has {len(ids)} tokens, fewer than one window of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - span - 1) for _ in range(nsamples)]
    windows = torch.stack([ids[s : s + span] for s in starts])
    if bos:
        windows = torch.cat([torch.full((nsamples, 1), bos[0], dtype=torch.long), windows], dim=1)
    return windows


def eval_windows(tokenizer: Any, name: str, seqlen: int, max_windows: int | None = None, data_dir: str | None = None,
                 split: str = "eval") -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows over the whole text of ``split`` (the test text for ``eval``,
    the training text for ``calib``), tail dropped (the standard protocol)."""
    ids = tokenize(tokenizer, load_text(name, split, data_dir))
    bos = [tokenizer.bos_token_id] if wants_bos(tokenizer) else []
    span = seqlen - len(bos)
    n = len(ids) // span
    if n == 0:
        raise LLMPruneError(f"evaluation text {name!r} has {len(ids)} tokens, fewer than one window of {seqlen}")
    if max_windows:
        n = min(n, max_windows)
    windows = ids[: n * span].view(n, span)
    if bos:
        windows = torch.cat([torch.full((n, 1), bos[0], dtype=torch.long), windows], dim=1)
    return windows
