"""Python API: the spine the CLI calls.

    model, tokenizer = llmprune.load_model("HuggingFaceTB/SmolLM2-135M")
    result = llmprune.prune(model, tokenizer, llmprune.PruneConfig(pattern="2:4", nsamples=128))
    result.save("out/smollm2-2of4")                       # patterns and masks as the pruner chose them
    ppl = llmprune.evaluate(model, tokenizer, ["wikitext2"])

Disk streaming is the same engine run with another block source: :func:`prune_checkpoint`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PruneConfig
from .data import calibration_windows, eval_windows
from .engine import InPlaceBlocks, Plan, StreamBlocks, check_shapes, model_identity, resolve_device, run_blocks
from .engine.sources import check_complete, skeleton
from .engine.workdir import WorkDir
from .errors import LLMPruneError
from .eval import perplexity
from .export.codecs import PackedMask
from .models import find_blocks
from .patterns import Pattern
from .quant import Grid
from .shards import SafetensorsDir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class PruneResult:
    """What a pruning run produced.

    ``record``: the run record (per-layer sparsity and error, timings); ``patterns``: target weight name ->
    the pattern it obeys (OWL gives each block its own); ``masks``: target weight name -> the mask its
    method chose (1 bit a weight; ``.unpack()`` gives the bool tensor); ``grids``: target weight name -> the
    quantization grid its kept weights lie on (quantized patterns only). ``model`` is the pruned model
    (in memory), ``path`` the checkpoint a streamed run wrote.

    With a work dir, it is kept until the output is safe: :meth:`save` removes it once the checkpoint is
    published (unless ``keep_work_dir``), :meth:`finish` removes it explicitly.
    """

    record: dict[str, Any]
    patterns: dict[str, Pattern]
    masks: dict[str, PackedMask]
    grids: dict[str, Grid] = field(default_factory=dict)
    model: nn.Module | None = None
    tokenizer: Any = None
    path: Path | None = None
    work: WorkDir | None = field(default=None, repr=False)

    def save(self, out_dir: str | os.PathLike, format: str = "compressed", overwrite: bool = False,
             extra_files: dict[str, bytes | str] | None = None, keep_work_dir: bool = False) -> Path:
        """Write the pruned model as a checkpoint (atomically); ``format`` ``compressed`` or ``dense``."""
        from .export import save_pruned

        if self.model is None:
            raise LLMPruneError(f"this run was streamed to {self.path}; its checkpoint is already saved")
        out = save_pruned(self.model, self.tokenizer, out_dir, format, self.patterns, self.masks, overwrite=overwrite,
                          extra_files=extra_files, grids=self.grids)
        if not keep_work_dir:
            self.finish()
        return out

    def finish(self) -> None:
        """Remove the work dir: the run's output is safe."""
        if self.work is not None:
            self.work.remove()
            self.work = None


def _calibration(config: PruneConfig, tokenizer: Any, calib: torch.Tensor | None, where: str) -> torch.Tensor:
    if calib is not None:
        return calib
    if tokenizer is None:
        raise LLMPruneError(f"{where} has no tokenizer: pass one, or calibration token ids (calib=...)")
    return calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed, config.data_dir)


def prune(model: nn.Module, tokenizer: Any, config: PruneConfig, calib: torch.Tensor | None = None,
          quiet: bool = False, plan: Plan | None = None) -> PruneResult:
    """Prune ``model`` in place, block by block. ``calib`` (``[n, seqlen]`` token ids) overrides the
    calibration data named in ``config``; ``plan`` is ``config.plan()`` when the caller already made it."""
    plan = plan or config.plan()
    prefix, blocks = find_blocks(model)
    n_targets = check_shapes(blocks, prefix, plan)  # refuse impossible patterns before reading any data
    calib = _calibration(config, tokenizer, calib, "the model")
    out = run_blocks(prefix, blocks, InPlaceBlocks(model, blocks), calib, plan, model_identity(model, blocks), quiet,
                     n_targets)
    return PruneResult(out.record, out.patterns, out.masks, out.grids, model, tokenizer, None, out.work)


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise LLMPruneError(f"{path}: cannot load the tokenizer: {e}") from e


def prune_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, config: PruneConfig, tokenizer: Any = None,
                     fmt: str = "compressed", overwrite: bool = False, calib: torch.Tensor | None = None,
                     dtype: str = "auto", quiet: bool = False, run_record: dict[str, Any] | None = None,
                     max_shard_bytes: int = 2**30, plan: Plan | None = None) -> PruneResult:
    """Prune the safetensors checkpoint in ``src_dir`` block by block into ``out_dir`` (written atomically),
    never holding the whole model: the same engine run as :func:`prune`, with blocks read from and
    written to disk. The tokenizer defaults to the one in ``src_dir``; ``run_record`` (e.g. the CLI's
    command and environment) is saved with the pruning record as ``llmprune_run.json``. Everything that
    can be checked (shards, shapes, pattern, output folder) is checked before pruning; the work dir is
    removed once the output is published.
    """
    from transformers import GenerationConfig

    from .export import CheckpointWriter
    from .export.save import ignored_linears, output_config

    t0 = time.perf_counter()
    plan = plan or config.plan()
    src_path = Path(src_dir).expanduser()
    src = SafetensorsDir(src_path)
    model = skeleton(src_path, src, dtype)
    source = check_complete(model, src)  # hub-layout experts are fused on the fly
    prefix, blocks = find_blocks(model)
    n_targets = check_shapes(blocks, prefix, plan)
    tokenizer = tokenizer if tokenizer is not None else _tokenizer(src_path)
    with CheckpointWriter(out_dir, fmt, overwrite, max_shard_bytes) as writer:  # refuses an existing out_dir
        calib = _calibration(config, tokenizer, calib, str(src_path))
        t_prepare = time.perf_counter() - t0
        io = StreamBlocks(model, prefix, blocks, source, writer, plan.skip)
        out = run_blocks(prefix, blocks, io, calib, plan, model_identity(model, blocks), quiet, n_targets)
        t1 = time.perf_counter()
        io.copy_outside()
        generation = GenerationConfig.from_pretrained(src_path) if (src_path / "generation_config.json").is_file() else None
        out.record["seconds"]["prepare"] = t_prepare
        run = json.dumps({**(run_record or {}), "prune": out.record}, indent=2, default=str)
        writer.finish(output_config(model), tokenizer, {"ignore": ignored_linears(model, out.patterns)},
                      {"llmprune_run.json": run}, generation)
    result = PruneResult(out.record, out.patterns, out.masks, out.grids, None, tokenizer, writer.out_dir, out.work)
    result.finish()  # only now: the output is published
    out.record["seconds"].update(write=time.perf_counter() - t1, total=time.perf_counter() - t0)
    return result


def evaluate(model: nn.Module, tokenizer: Any, datasets: Sequence[str] = ("wikitext2",), seqlen: int = 2048,
             windows: int | None = None, device: str = "auto", data_dir: str | None = None, batch_size: int = 1,
             quiet: bool = False) -> dict[str, float]:
    """Perplexity on each dataset (name or text-file path) with the standard non-overlapping protocol."""
    dev = resolve_device(device)
    return {
        name: perplexity(model, eval_windows(tokenizer, name, seqlen, windows, data_dir), dev, batch_size, f"eval {name}", quiet)
        for name in datasets
    }
