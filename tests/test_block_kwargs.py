"""Every block is run with its own keyword arguments (issue #13.10): hybrid-attention models give sliding-window
and full-attention blocks different masks and rotary tables, so block 0's kwargs are wrong for the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmprune import PruneConfig
from llmprune.engine import InPlaceBlocks, StreamBlocks, model_identity, run_blocks
from llmprune.engine.sources import skeleton
from llmprune.export import CheckpointWriter
from llmprune.models import find_blocks
from llmprune.shards import SafetensorsDir

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(0))
WINDOW = 8  # shorter than the 32-token calibration windows, so sliding and full attention differ
HYBRID = {
    "gemma3_text": dict(num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=2),
    "gemma2": dict(num_hidden_layers=4, sliding_window=WINDOW, head_dim=16),
    "gpt_oss": dict(num_hidden_layers=4, sliding_window=WINDOW, head_dim=16, num_local_experts=4,
                    num_experts_per_tok=2),
}


def _model(arch: str):
    model = tiny_model(arch, **HYBRID[arch])
    types = getattr(model.config, "layer_types", None)
    assert types is not None and len(set(types)) == 2, types  # really hybrid
    return model


def _truth(model) -> list[list[torch.Tensor]]:
    """Per block, per calibration batch of 4: the hidden states the model's own forward feeds it."""
    with torch.no_grad():
        outs = [model(b, use_cache=False, output_hidden_states=True).hidden_states for b in CALIB.split(4)]
    return [[o[i] for o in outs] for i in range(model.config.num_hidden_layers)]


def _spy(blocks) -> list[list[torch.Tensor]]:
    """Each block's first input for each batch, as the engine feeds it (not the capture's catchers)."""
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    for i, block in enumerate(blocks):
        def hook(m, args, kwargs, i=i):  # noqa: ANN001, ANN202
            if len(seen[i]) < 2 and "forward" not in m.__dict__:
                seen[i].append((args[0] if args else kwargs["hidden_states"]).clone())

        block.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


PLAN = PruneConfig(method="admm", sparsity=0.0, batch_size=4).plan()


@pytest.mark.parametrize("arch", list(HYBRID))
def test_in_memory_blocks_get_their_own_inputs(arch):
    model = _model(arch)
    truth = _truth(model)
    prefix, blocks = find_blocks(model)
    seen = _spy(blocks)
    run_blocks(prefix, blocks, InPlaceBlocks(model, blocks), CALIB, PLAN, model_identity(model, blocks), quiet=True)
    for i in range(len(blocks)):
        assert all(torch.equal(a, b) for a, b in zip(seen[i], truth[i], strict=True)), f"block {i}"


@pytest.mark.parametrize("arch", list(HYBRID))
def test_streamed_blocks_get_their_own_inputs(tmp_path: Path, arch):
    model = _model(arch)
    truth = _truth(model)
    model.save_pretrained(tmp_path / "src")
    shards = SafetensorsDir(tmp_path / "src")
    lazy = skeleton(tmp_path / "src", shards)
    prefix, blocks = find_blocks(lazy)
    seen = _spy(blocks)
    with CheckpointWriter(tmp_path / "out") as writer:  # never finished: aborted on exit
        run_blocks(prefix, blocks, StreamBlocks(lazy, prefix, blocks, shards, writer, ()), CALIB, PLAN,
                   model_identity(lazy, blocks), quiet=True)
    for i in range(len(blocks)):
        assert all(torch.equal(a, b) for a, b in zip(seen[i], truth[i], strict=True)), f"block {i}"


def test_block_zero_kwargs_would_be_wrong():
    """The bug this guards against: a full-attention block run with block 0's (sliding) kwargs differs."""
    from llmprune.engine import capture_inputs

    model = _model("gemma3_text")
    _, blocks = find_blocks(model)
    acts = capture_inputs(model, blocks, CALIB[:4], 4, torch.device("cpu"), torch.device("cpu"))
    full = model.config.layer_types.index("full_attention")
    truth = _truth(model)
    with torch.no_grad():
        x = truth[full][0]
        own = blocks[full](x, **acts.kwargs[full][4])
        wrong = blocks[full](x, **acts.kwargs[0][4])
        nxt = truth[full + 1][0]
    assert torch.equal(own, nxt) and not torch.allclose(wrong, nxt, atol=1e-3)
