"""Pruning a checkpoint streamed from disk gives exactly what pruning the loaded model gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import llmprune
from llmprune import LLMPruneError, PruneConfig
from llmprune.engine import capture_inputs
from llmprune.models import find_blocks, load_model
from llmprune.shards import SafetensorsDir
from llmprune import prune_checkpoint
from llmprune.engine import StreamBlocks
from llmprune.engine.sources import skeleton

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(0))
CPU = torch.device("cpu")




def _save(path: Path, tokenizer=None, shard: str = "1GB", dtype: torch.dtype = torch.float32, **kw) -> Path:
    """A tiny random model saved like a hub checkpoint (``load_model`` also wants a tokenizer)."""
    tiny_model(**kw).to(dtype).save_pretrained(path, max_shard_size=shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("gemma3_text", torch.float32)])
def test_captured_inputs_equal_the_in_memory_path(tmp_path, tokenizer, arch, dtype):
    src = _save(tmp_path / "m", tokenizer, arch=arch, dtype=dtype)
    model, _ = load_model(str(src))
    _, blocks = find_blocks(model)
    ref = capture_inputs(model, blocks, CALIB, 4, CPU, CPU)

    shards = SafetensorsDir(src)
    lazy = skeleton(src, shards)
    prefix, lazy_blocks = find_blocks(lazy)
    acts = StreamBlocks(lazy, prefix, lazy_blocks, shards, None, []).capture(CALIB, 4, CPU, CPU)
    assert len(acts.batches) == 2 and all(torch.equal(a, b) for a, b in zip(acts.batches, ref.batches))
    assert acts.batches[0].dtype == dtype
    assert len(acts.kwargs) == len(ref.kwargs) == len(blocks)  # every block's own kwargs
    for ours, theirs in zip(acts.kwargs, ref.kwargs):
        assert ours.keys() == theirs.keys()
        for size, kwargs in theirs.items():
            assert kwargs.keys() == ours[size].keys()
            flat = [(a, b) for k in kwargs for a, b in zip(torch.utils._pytree.tree_leaves(kwargs[k]),
                                                           torch.utils._pytree.tree_leaves(ours[size][k]))]
            assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in flat)
    assert all(p.is_meta for p in lazy.parameters())  # what capture read is dropped again


@pytest.mark.parametrize("method,pattern,sparsity,layout,extra", [
    ("admm", "2:4", None, dict(shard="40KB", tie_word_embeddings=True), {}),  # sharded, tied embeddings
    ("wanda", "unstructured", 0.5, dict(num_hidden_layers=3), {}),  # single file
    ("sparsegpt", "4x4:8", None, dict(num_hidden_layers=3), dict(dense_targets=True, sequential=True)),
    ("admm", "unstructured", 0.6, dict(num_hidden_layers=3), dict(allocation="owl", owl_lambda=0.1)),  # mixed sparsities
    ("admm", "2:4", None, dict(num_hidden_layers=3), dict(tune_epochs=2, tune_lr=1e-3)),  # block reconstruction
    ("admm", "2:4", None, dict(num_hidden_layers=2), dict(quant="int4", group_size=32)),  # sparse + int4 codes
])
def test_streamed_result_equals_in_memory(tmp_path, tokenizer, method, pattern, sparsity, layout, extra):
    src = _save(tmp_path / "m", tokenizer, **layout)
    config = PruneConfig(method=method, pattern=pattern, sparsity=sparsity, batch_size=4, **extra)
    model, _ = load_model(str(src))
    ref = llmprune.prune(model, None, config, calib=CALIB, quiet=True).record
    record = prune_checkpoint(src, tmp_path / "out", config, calib=CALIB, quiet=True).record

    pruned = llmprune.load(tmp_path / "out")
    got, want = pruned.state_dict(), model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    untimed = [[{k: v for k, v in r.items() if k != "seconds"} for r in rec["layers"]] for rec in (record, ref)]
    assert untimed[0] == untimed[1]
    saved = json.loads((tmp_path / "out" / "llmprune_run.json").read_text())
    assert len(saved["prune"]["seconds"]["blocks"]) == len(find_blocks(model)[1])


def test_calibration_text_and_tokenizer_come_from_the_checkpoint(tmp_path, tokenizer, text_file):
    src = _save(tmp_path / "m", tokenizer)
    config = PruneConfig(method="wanda", pattern="2:4", calib=str(text_file), nsamples=4, seqlen=32)
    record = prune_checkpoint(src, tmp_path / "out", config, quiet=True).record
    assert record["sparsity"] == 0.5 and (tmp_path / "out" / "tokenizer.json").is_file()


def _shards(src: Path) -> list[Path]:
    return sorted(src.glob("model-*.safetensors"))


def _truncate_tail(src: Path) -> None:
    path = _shards(src)[1]
    path.write_bytes(path.read_bytes()[:-100])


def _truncate_header(src: Path) -> None:
    _shards(src)[0].write_bytes(b"\x10\x00")


def _drop_from_index(src: Path) -> None:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("damage,message", [
    (lambda src: _shards(src)[-1].unlink(), "shard listed in .* is missing"),
    (_truncate_tail, "corrupt or truncated shard: header promises"),
    (_truncate_header, "truncated shard"),
    (_drop_from_index, "model.layers.1.mlp.up_proj.weight: missing from the checkpoint"),
    (lambda src: (src / "model.safetensors.index.json").unlink(), "no model.safetensors"),
])
def test_damaged_checkpoint_is_refused_before_pruning(tmp_path, monkeypatch, sharded, damage, message):
    src = tmp_path / "m"
    shutil.copytree(sharded, src)
    damage(src)

    def never(*_a, **_k):
        raise AssertionError("pruning started")

    monkeypatch.setattr("llmprune.api.run_blocks", never)
    with pytest.raises(LLMPruneError, match=message):
        prune_checkpoint(src, tmp_path / "out", PruneConfig(pattern="2:4"), calib=CALIB, quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no output, no temp folder left behind


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A sharded tiny checkpoint for the damage tests (each damages its own copy)."""
    return _save(tmp_path_factory.mktemp("sharded"), shard="40KB")


def test_existing_output_is_refused_before_pruning(tmp_path, monkeypatch):
    src = _save(tmp_path / "m")
    (tmp_path / "out").mkdir()
    monkeypatch.setattr("llmprune.api.run_blocks", lambda *a, **k: pytest.fail("pruning started"))
    with pytest.raises(LLMPruneError, match="already exists"):
        prune_checkpoint(src, tmp_path / "out", PruneConfig(pattern="2:4"), calib=CALIB, quiet=True)


def test_scale_benchmark_runs_on_a_tiny_shape(tmp_path):
    """benchmarks/scale.py end to end on CPU: random checkpoint, one pruning run in a worker, a labelled row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale", Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    out = tmp_path / "scale.json"
    assert scale.main(["--shape", "tiny", "--runs", "wanda@2:4", "--blocks", "2", "--nsamples", "4", "--seqlen", "32",
                       "--device", "cpu", "--quiet", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["device"].startswith("cpu") and row["peak_gpu_gib"] is None and row["peak_host_gib"] > 0
    assert (row["blocks"], row["blocks_total"], row["pattern"], row["sparsity"]) == (2, 4, "2:4", 0.5)
    assert len(row["block_seconds"]) == 2 and row["est_full_seconds"] > row["prune_seconds"]
