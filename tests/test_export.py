"""Export: bit-exact codecs, the streaming writer, verified loading, corruption handling and inspect."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from llmprune.errors import LLMPruneError
from llmprune.export import Checkpoint, CheckpointWriter, decode, encode, inspect, inspect_main, load, save_pruned
from llmprune.export.codecs import pack_bits, unpack_bits
from llmprune.patterns import Pattern, parse_pattern

PATTERNS = {
    "unstructured-row-0.7": parse_pattern("unstructured", 0.7),
    "unstructured-layer-0.5": parse_pattern("unstructured", 0.5, "layer"),
    "2:4": parse_pattern("2:4"),
    "4:8": parse_pattern("4:8"),
    "1:4": parse_pattern("1:4"),
    "4x4:8": parse_pattern("4x4:8"),
    "2x2:1": parse_pattern("2x2:1"),
    "2x3:2": parse_pattern("2x3:2"),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype])


def pruned(shape: tuple[int, int], pattern: Pattern, dtype: torch.dtype, seed: int, extra_zeros: float = 0.0):
    """A random weight obeying ``pattern``, with ``extra_zeros`` of the kept ones zeroed too (so structured
    groups sometimes hold fewer than N non-zeros)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    keep = pattern.project(torch.rand(shape, generator=g)) & (torch.rand(shape, generator=g) >= extra_zeros)
    return torch.where(keep, w, torch.zeros((), dtype=dtype))


def unit(pattern: Pattern) -> tuple[int, int]:
    """Smallest weight shape the pattern tiles."""
    return {"nm": (1, pattern.m), "tile": (pattern.r, pattern.c)}.get(pattern.kind, (1, 1))


# --- codecs -----------------------------------------------------------------------------------------


@given(rows=st.integers(1, 5), cols=st.integers(1, 21), seed=st.integers(0, 2**16))
@settings(max_examples=30, deadline=None)
def test_bitmask_packing_is_numpy_little_bitorder(rows: int, cols: int, seed: int) -> None:
    # compressed-tensors packs with numpy.packbits(axis=-1, bitorder="little"); ours must be byte-identical.
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed = pack_bits(mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bits(packed, (rows, cols)), mask)


@given(spec=st.sampled_from(sorted(PATTERNS)), dtype=st.sampled_from(DTYPES), rows=st.integers(1, 6),
       cols=st.integers(1, 6), extra_zeros=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
@settings(max_examples=120, deadline=None)
def test_codec_round_trip_is_bit_exact(spec: str, dtype: torch.dtype, rows: int, cols: int, extra_zeros: float,
                                       seed: int) -> None:
    pattern = PATTERNS[spec]
    ur, uc = unit(pattern)
    shape = (rows * ur, cols * uc * (3 if pattern.kind == "unstructured" else 1))
    weight = pruned(shape, pattern, dtype, seed, extra_zeros)
    parts = encode(weight, pattern, "w")
    assert parts["compressed"].dtype == dtype and parts["bitmask"].dtype == torch.uint8
    if pattern.kind == "nm":  # exactly N values per group, [out, in*N/M] as in sparse-24-bitmask
        assert parts["compressed"].shape == (shape[0], shape[1] * pattern.n // pattern.m)
    out = decode(parts, pattern, "w")
    assert out.dtype == dtype and torch.equal(bits(out), bits(weight))


def test_negative_zero_decodes_as_positive_zero() -> None:
    # weight * mask leaves -0.0 where it pruned negatives: numerically zero, not worth a stored value.
    for pattern in (PATTERNS["unstructured-row-0.7"], PATTERNS["2:4"]):
        w = torch.randn(4, 16)
        w = w * pattern.project(w.abs())
        assert bool(torch.signbit(w[w == 0]).any())
        out = decode(encode(w, pattern, "w"), pattern, "w")
        assert torch.equal(out, w) and not bool(torch.signbit(out[out == 0]).any())


def test_encode_refuses_weight_breaking_its_pattern() -> None:
    with pytest.raises(LLMPruneError, match=r"layer\.weight: 1 group\(s\) break .*2:4"):
        w = torch.ones(2, 8)
        w[0, 4:] = 0
        w[1] = torch.tensor([1.0, 0, 1, 0, 1, 0, 0, 1])
        encode(w, PATTERNS["2:4"], "layer.weight")
    with pytest.raises(LLMPruneError, match="not divisible"):
        encode(torch.zeros(4, 6), PATTERNS["2:4"], "w")


# --- size ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "bound"), [("2:4", 0.57), ("4:8", 0.57), ("4x4:8", 0.57),
                                             ("unstructured-row-0.7", 0.45)])
def test_compressed_size_bounds(tmp_path: Path, spec: str, bound: float) -> None:
    pattern = PATTERNS[spec]
    shapes = {"a.weight": (256, 512), "b.weight": (512, 256)}
    with CheckpointWriter(tmp_path / "ckpt") as writer:
        for i, (name, shape) in enumerate(shapes.items()):
            writer.add(name, pruned(shape, pattern, torch.float16, i), pattern)
        writer.finish(LlamaConfig())
    ckpt = Checkpoint(tmp_path / "ckpt")
    for name, shape in shapes.items():
        assert ckpt.stored_size(name) <= bound * shape[0] * shape[1] * 2, name


# --- writer -------------------------------------------------------------------------------------------


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_writer_refuses_existing_dir_and_replaces_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LLMPruneError, match="already exists"):
        CheckpointWriter(out)
    with CheckpointWriter(out, overwrite=True) as writer:
        writer.add("x", torch.ones(3))
        writer.finish(LlamaConfig(), extra_files={"notes/report.json": "{}", "blob.bin": b"\x00\x01"})
    assert not (out / "old.txt").exists() and (out / "notes/report.json").read_text() == "{}"
    assert (out / "blob.bin").read_bytes() == b"\x00\x01"
    assert _siblings(out) == ["out"]  # neither temp nor old folder left beside it


def test_writer_cleans_up_on_failure_and_unfinished_exit(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(LLMPruneError, match="bad.weight"):
        with CheckpointWriter(out) as writer:
            writer.add("ok", torch.ones(2))
            writer.add("bad.weight", torch.ones(4, 8), PATTERNS["2:4"])
    with CheckpointWriter(out) as writer:
        writer.add("ok", torch.ones(2))  # leaves without finish
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, max_shard_bytes=8) as writer:
            writer.add("ok", torch.ones(8))
            raise RuntimeError("boom")
    with pytest.raises(LLMPruneError, match="extra file"):
        with CheckpointWriter(out) as writer:
            writer.add("ok", torch.ones(2))
            writer.finish(LlamaConfig(), extra_files={"../escape.txt": "x"})
    assert not out.exists() and _siblings(out) == []


def test_writer_streams_shards_and_copies_inputs(tmp_path: Path) -> None:
    out, pattern = tmp_path / "out", PATTERNS["2:4"]
    weights = {f"l{i}.weight": pruned((16, 32), pattern, torch.float32, i) for i in range(4)}
    with CheckpointWriter(out, max_shard_bytes=1500) as writer:
        for name, w in weights.items():
            writer.add(name, w, pattern)
            w.fill_(7.0)  # the writer must not keep a reference to the caller's buffer
        writer.finish(LlamaConfig())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ckpt = Checkpoint(out)
    for i, name in enumerate(weights):
        assert torch.equal(ckpt.weight(name), pruned((16, 32), pattern, torch.float32, i))


# --- tiny Llama round trip ------------------------------------------------------------------------------

MIXED = {"self_attn": PATTERNS["2:4"], "gate_proj": PATTERNS["4x4:8"], "up_proj": PATTERNS["4:8"],
         "down_proj": PATTERNS["unstructured-row-0.7"]}


def tiny_llama(tied: bool, mixed: bool) -> tuple[torch.nn.Module, dict[str, Pattern]]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config).eval()
    patterns = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                pattern = next((p for key, p in MIXED.items() if key in name), None) if mixed else PATTERNS["2:4"]
                module.weight.mul_(pattern.project(module.weight.abs()))
                patterns[f"{name}.weight"] = pattern
    return model, patterns


TOKENS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["compressed", "dense"])
@pytest.mark.parametrize(("tied", "mixed"), [(False, False), (True, True)])
def test_tiny_llama_round_trip_gives_identical_logits(tmp_path: Path, fmt: str, tied: bool, mixed: bool) -> None:
    model, patterns = tiny_llama(tied, mixed)
    expected = model(TOKENS).logits
    out = save_pruned(model, None, tmp_path / "ckpt", fmt, patterns)
    config = json.loads((out / "config.json").read_text())["sparsity_config"]
    assert config["targets"] == list(patterns) and config["pattern"] == ("mixed" if mixed else "2:4")
    assert "lm_head.weight" in config["ignore"]
    for compressed_modules in (False, True):
        loaded = load(out, compressed_modules=compressed_modules)
        assert not loaded.training
        assert torch.equal(loaded(TOKENS).logits, expected)
        kinds = {type(loaded.get_submodule(n.removesuffix(".weight"))).__name__ for n in patterns}
        assert kinds == {"CompressedLinear" if compressed_modules else "Linear"}
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_load_casts_dtype_and_dense_format_loads_with_transformers(tmp_path: Path) -> None:
    model, patterns = tiny_llama(tied=False, mixed=False)
    out = save_pruned(model.to(torch.bfloat16), None, tmp_path / "ckpt", "dense", patterns)
    ours = load(out)
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    cast = load(out, dtype="float32")
    assert cast.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert cast.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are not cast
    # (The in-memory model.to(bf16) also cast its rotary inv_freq, so compare with a transformers load.)
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(plain(TOKENS).logits, ours(TOKENS).logits)


@pytest.mark.parametrize("tied,mixed", [(False, False), (True, True)])
def test_plain_from_pretrained_decodes_the_compressed_format(tmp_path: Path, tied: bool, mixed: bool) -> None:
    """With llmprune imported, transformers' own loader decodes the compressed weights (quant_method llmprune)."""
    model, patterns = tiny_llama(tied=tied, mixed=mixed)
    out = save_pruned(model, None, tmp_path / "ckpt", "compressed", patterns)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "llmprune"
    want = load(out)(TOKENS).logits
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(plain(TOKENS).logits, want)
    assert getattr(plain.config, "quantization_config", None) is None  # an ordinary dense model now
    half = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    assert half.dtype == torch.float16
    assert all(torch.equal(half.get_parameter(n), model.get_parameter(n).half()) for n in patterns)
    plain.save_pretrained(tmp_path / "again")  # and it saves and reloads like any transformers model
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "again")(TOKENS).logits, want)


def test_from_pretrained_without_llmprune_fails_loudly(tmp_path: Path) -> None:
    """transformers (5.24) only warns about an unknown quantization method; the empty guard stored under each
    pruned weight's name turns what would be a randomly initialised weight into a size-mismatch error."""
    import subprocess
    import sys

    model, patterns = tiny_llama(tied=False, mixed=False)
    out = save_pruned(model, None, tmp_path / "ckpt", "compressed", patterns)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, "plain transformers loaded a compressed checkpoint (random pruned weights)"
    assert "Unknown quantization type, got llmprune" in proc.stderr, proc.stderr[-2000:]
    assert "ignore_mismatched_sizes" in proc.stderr and "up_proj.weight" in proc.stderr


def test_checkpoints_without_guards_still_load(tmp_path: Path) -> None:
    """Compressed checkpoints written before the guard tensors existed read exactly as before."""
    model, patterns = tiny_llama(tied=False, mixed=False)
    out = save_pruned(model, None, tmp_path / "ckpt", "compressed", patterns)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        tensors = load_file(out / shard)
        assert all(tensors[n].numel() == 0 for n in patterns if n in tensors)
        save_file({k: v for k, v in tensors.items() if k not in patterns}, out / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in patterns}
    index["metadata"]["llmprune_crc32"] = {k: v for k, v in index["metadata"]["llmprune_crc32"].items()
                                           if k not in patterns}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    want = model(TOKENS).logits
    assert torch.equal(load(out)(TOKENS).logits, want)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(TOKENS).logits, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plain_from_pretrained_builds_the_kernel_modules(tmp_path: Path) -> None:
    from llmprune.export.hf import LLMPruneQuantizationConfig
    from llmprune.kernels import SparseLinear

    model, patterns = tiny_llama(tied=False, mixed=False)
    out = save_pruned(model.half(), None, tmp_path / "ckpt", "compressed", patterns)
    fast = AutoModelForCausalLM.from_pretrained(out, device_map="cuda", dtype=torch.float16,
                                                quantization_config=LLMPruneQuantizationConfig(kernels=True))
    assert {type(fast.get_submodule(n.removesuffix(".weight"))) for n in patterns} == {SparseLinear}
    ours = load(out, device="cuda", kernels=True)
    ids = TOKENS.cuda()
    assert torch.allclose(fast(ids).logits.float(), ours(ids).logits.float(), atol=1e-3, rtol=1e-3)


def test_save_pruned_refuses_unknown_pattern_target(tmp_path: Path) -> None:
    model, _ = tiny_llama(tied=False, mixed=False)
    with pytest.raises(LLMPruneError, match="nope.weight"):
        save_pruned(model, None, tmp_path / "ckpt", patterns={"nope.weight": PATTERNS["2:4"]})
    assert not (tmp_path / "ckpt").exists()


# --- corruption -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    model, patterns = tiny_llama(tied=False, mixed=True)
    compressed = save_pruned(model, None, root / "compressed", "compressed", patterns)
    model, patterns = tiny_llama(tied=False, mixed=False)
    unstructured = {n: PATTERNS["unstructured-layer-0.5"] for n in patterns}
    with torch.no_grad():  # back to dense, then 50% unstructured over each whole layer
        for name, pattern in unstructured.items():
            weight = model.get_parameter(name)
            weight.copy_(torch.randn_like(weight) * pattern.project(torch.rand_like(weight)))
    return {"compressed": compressed, "dense": save_pruned(model, None, root / "dense", "dense", unstructured)}


@pytest.fixture
def copy(saved: dict[str, Path], tmp_path: Path):
    def make(fmt: str = "compressed") -> Path:
        return Path(shutil.copytree(saved[fmt], tmp_path / fmt))
    return make


def shard(ckpt: Path) -> Path:
    return next(ckpt.glob("model-*.safetensors"))


def data_offset(path: Path, name: str) -> int:
    """Absolute file offset of tensor ``name``'s first byte."""
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return 8 + size + json.loads(raw[8:8 + size])[name]["data_offsets"][0]


def test_truncated_shard(copy) -> None:
    ckpt = copy()
    path = shard(ckpt)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LLMPruneError, match=rf"{path.name}: corrupt or truncated"):
        load(ckpt)
    assert inspect_main([str(ckpt)]) == 2


def test_flipped_bytes_are_caught_by_checksum(copy, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = copy()
    path, name = shard(ckpt), "model.layers.0.mlp.up_proj.compressed"
    raw = bytearray(path.read_bytes())
    raw[data_offset(path, name) + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(LLMPruneError, match=rf"{name} in {path.name}: checksum mismatch"):
        load(ckpt)
    assert inspect_main([str(ckpt)]) == 1
    assert f"FAIL model.layers.0.mlp.up_proj.weight: {name}" in capsys.readouterr().out


def test_tensor_missing_from_shard(copy) -> None:
    ckpt = copy()
    path, name = shard(ckpt), "model.layers.1.self_attn.q_proj.bitmask"
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match=rf"{name}: listed in .* missing from shard {path.name}"):
        load(ckpt)


def test_config_hidden_size_mismatch(copy) -> None:
    ckpt = copy()
    config = json.loads((ckpt / "config.json").read_text())
    config["hidden_size"] = 32
    (ckpt / "config.json").write_text(json.dumps(config))
    expected = r"(lm_head|embed_tokens)\.weight: stored shape \(128, 64\) but config\.json implies \(128, 32\)"
    with pytest.raises(LLMPruneError, match=expected):
        load(ckpt)


def test_declared_2_4_layer_that_is_not_2_4(copy) -> None:
    ckpt = copy("dense")  # saved as 50% unstructured (per layer)
    config = json.loads((ckpt / "config.json").read_text())
    config["sparsity_config"].update(pattern="2:4", sparsity=0.5, granularity="row")
    (ckpt / "config.json").write_text(json.dumps(config))
    first = r"model\.layers\.0\.self_attn\.q_proj\.weight"
    with pytest.raises(LLMPruneError, match=first + r": \d+ group\(s\) break .*2:4"):
        load(ckpt)
    report = inspect(ckpt)
    assert not report["ok"] and not any(r["ok"] for r in report["layers"])


def test_compressed_bitmask_breaking_2_4_even_with_valid_checksum(copy) -> None:
    ckpt = copy()
    path, name = shard(ckpt), "model.layers.0.self_attn.k_proj.bitmask"
    tensors = load_file(path)
    tensors[name][0, 0] = 0b00000111  # three kept positions in the first group of 4
    save_file(tensors, path, metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["metadata"]["llmprune_crc32"][name] = f"{zlib.crc32(tensors[name].numpy()):08x}"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LLMPruneError, match=r"k_proj\.weight: bitmask does not mark exactly 2 positions"):
        load(ckpt)


def test_not_an_llmprune_checkpoint(copy) -> None:
    ckpt = copy()
    config = json.loads((ckpt / "config.json").read_text())
    del config["sparsity_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(LLMPruneError, match="no sparsity_config"):
        load(ckpt)
    with pytest.raises(LLMPruneError, match="no config.json"):
        load(ckpt / "missing")


# --- inspect --------------------------------------------------------------------------------------------


def test_inspect_reports_every_layer(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = inspect(saved["compressed"])
    assert report["ok"] and report["format"] == "compressed" and report["totals"]["layers"] == 14
    by_name = {r["name"]: r for r in report["layers"]}
    down = by_name["model.layers.1.mlp.down_proj.weight"]
    assert down["pattern"] == "unstructured" and down["sparsity"] == pytest.approx(0.7, abs=0.01)
    assert down["stored_bytes"] < 0.45 * down["dense_bytes"]
    assert inspect_main([str(saved["compressed"])]) == 0
    table = capsys.readouterr().out
    assert re.search(r"model\.layers\.0\.mlp\.gate_proj\.weight +4x4:8 +0\.500 +32768 +\d+ +0\.5\d+ +ok", table)
    assert "total: 14 pruned layers (0 failed)" in table
    assert inspect_main([str(saved["dense"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "dense"


@pytest.mark.parametrize("fmt", ["compressed"])
def test_saved_positions_are_the_pruners_mask_not_the_zeros(tmp_path: Path, fmt: str) -> None:
    """A weight the pruner kept but which is exactly 0 stays a kept position: saved, read back and packed."""
    import llmprune
    from llmprune import PruneConfig
    from llmprune.kernels import layout_for, pack

    from .conftest import tiny_model

    model = tiny_model()
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    result = llmprune.prune(model, None, PruneConfig(method="wanda", pattern="2:4", batch_size=4), calib=calib, quiet=True)
    name = "model.layers.0.mlp.down_proj.weight"
    mask = result.masks[name].unpack()
    lin = model.get_submodule(name.removesuffix(".weight"))
    keep = mask.nonzero()[0]
    with torch.no_grad():
        lin.weight[keep[0], keep[1]] = 0.0  # kept, yet zero
    assert (mask.sum() == mask.numel() // 2) and bool(mask[keep[0], keep[1]])
    out = result.save(tmp_path / "ckpt", fmt)
    ckpt = llmprune.export.Checkpoint(out)
    assert torch.equal(ckpt.mask(name), mask)  # from the stored bitmask, not from weight != 0
    assert not torch.equal(ckpt.weight(name) != 0, mask)
    packed = pack(ckpt.weight(name), layout_for("2:4"), ckpt.mask(name))
    assert torch.equal(llmprune.kernels.unpack(packed), ckpt.weight(name))


def test_gguf_quantization_metadata_is_not_inherited(tmp_path: Path) -> None:
    """A model loaded from GGUF carries quant_method gguf though its weights are dequantized; the saved config
    must say what the weights are, so plain transformers can re-save it and Trainer can train it."""
    import transformers

    from .conftest import tiny_model

    model = tiny_model()
    model.config.quantization_config = {"quant_method": "gguf", "dequantize": True}  # as transformers leaves it
    save_pruned(model, None, tmp_path / "dense", "dense", {})
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    plain.save_pretrained(tmp_path / "again")  # refused for a model that claims to be gguf-quantized
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(tmp_path / "trainer", max_steps=1, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no")
    before = plain.model.layers[0].mlp.up_proj.weight.detach().clone()
    transformers.Trainer(model=plain, args=args, train_dataset=data).train()
    assert not torch.equal(plain.model.layers[0].mlp.up_proj.weight, before)  # one real training step
