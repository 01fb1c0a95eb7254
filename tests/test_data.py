"""Calibration and evaluation windows: sampling, BOS handling, the non-overlapping protocol."""

from __future__ import annotations

import copy

import pytest
import torch

from llmprune.data import calibration_windows, eval_windows, tokenize, wants_bos


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The test tokenizer made to prepend BOS, like Gemma's and Llama-2's."""
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tokenizer)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


def test_windows_are_seeded_slices_of_the_text(tokenizer, text_file):
    ids = tokenize(tokenizer, text_file.read_text())
    a = calibration_windows(tokenizer, str(text_file), 8, 24, seed=0)
    assert a.shape == (8, 24)
    assert torch.equal(a, calibration_windows(tokenizer, str(text_file), 8, 24, seed=0))
    assert not torch.equal(a, calibration_windows(tokenizer, str(text_file), 8, 24, seed=1))
    for row in a:  # every window is a contiguous slice of the tokenized text
        starts = (ids[: len(ids) - 23] == row[0]).nonzero().flatten()
        assert any(torch.equal(ids[s : s + 24], row) for s in starts.tolist())


def test_bos_starts_every_window(tokenizer, bos_tokenizer, text_file):
    assert not wants_bos(tokenizer) and wants_bos(bos_tokenizer)
    bos = bos_tokenizer.bos_token_id
    calib = calibration_windows(bos_tokenizer, str(text_file), 4, 16, seed=0)
    evals = eval_windows(bos_tokenizer, str(text_file), 16, max_windows=5)
    for windows in (calib, evals):
        assert windows.shape[1] == 16 and (windows[:, 0] == bos).all() and not (windows[:, 1:] == bos).any()


def test_eval_windows_are_non_overlapping_and_drop_the_tail(tokenizer, text_file):
    ids = tokenize(tokenizer, text_file.read_text())
    windows = eval_windows(tokenizer, str(text_file), 32)
    assert windows.shape == (len(ids) // 32, 32)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert eval_windows(tokenizer, str(text_file), 32, max_windows=3).shape == (3, 32)


def test_offline_ptb_is_the_online_protocol(tmp_path):
    """PTB offline reads the same text the online loader builds: stripped sentences joined by single spaces."""
    from llmprune.data import load_text

    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" the cat sat \n a dog ran \n")
    assert load_text("ptb", "eval", str(tmp_path)) == " ".join(["the cat sat", "a dog ran"])
