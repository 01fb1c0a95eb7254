"""A run killed mid-way continues from its work dir and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llmprune
from llmprune import LLMPruneError, PruneConfig
from llmprune.engine import InPlaceBlocks
from llmprune.models import load_model
from llmprune import prune_checkpoint

from .conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CALIB = torch.randint(0, 96, (6, 32), generator=torch.Generator().manual_seed(0))
LAYERS = 4

# Prunes SRC into OUT with a work dir and stops at a chosen point, telling the test it got there; the test
# then SIGKILLs it. os.replace is the commit primitive of every work-dir file, so that is where to stop.
KILLED_RUN = textwrap.dedent("""
    import os, sys, time, torch
    torch.set_num_threads(1)
    from llmprune import PruneConfig
    from llmprune import prune_checkpoint

    src, out, work, calib, where = sys.argv[1:]
    real_replace, commits = os.replace, []

    def replace(tmp, dst):  # commits of state.json: capture, block 0, block 1, block 2, ...
        if os.path.basename(dst) == "state.json":
            commits.append(dst)
            if where == "mid" and len(commits) == 4:  # block 2 and the next inputs are on disk, state is not
                print("READY", flush=True)
                time.sleep(600)
        real_replace(tmp, dst)
        if where == "after" and len(commits) == 3:  # block 1 fully committed
            print("READY", flush=True)
            time.sleep(600)

    os.replace = replace
    config = PruneConfig(method="admm", pattern="2:4", batch_size=4, work_dir=work)
    prune_checkpoint(src, out, config, calib=torch.load(calib), quiet=True)
    print("FINISHED", flush=True)
""")





def _kill_when(script: str, argv: list[str], marker: str) -> None:
    """Run ``script`` in a child and SIGKILL it as soon as it prints ``marker``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line == f"{marker}\n", f"child did not reach the kill point: {line!r} {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def src(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny4")
    tiny_model(num_hidden_layers=LAYERS).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(**kw) -> PruneConfig:
    return PruneConfig(**{"method": "admm", "pattern": "2:4", "batch_size": 4, **kw})


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = llmprune.load(a).state_dict(), llmprune.load(b).state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("where", ["after", "mid"])
def test_killed_stream_run_resumes_bit_identical(tmp_path, src, where):
    work, calib = tmp_path / "work", tmp_path / "calib.pt"
    torch.save(CALIB, calib)
    _kill_when(KILLED_RUN, [str(src), str(tmp_path / "out"), str(work), str(calib), where], "READY")
    assert not (tmp_path / "out").exists()
    assert (work / "state.json").is_file() and (work / "block-00001.safetensors").is_file()
    if where == "mid":  # stray files of the unfinished commit, which the resumed run must ignore
        assert (work / "block-00002.safetensors").is_file() and list(work.glob(".state.json.*.tmp"))

    record = prune_checkpoint(src, tmp_path / "out", _config(work_dir=str(work), resume=True), calib=CALIB, quiet=True).record
    assert record["resumed_from"] == 2 and len(record["seconds"]["blocks"]) == LAYERS
    assert not work.exists()  # removed once the output is published
    ref = prune_checkpoint(src, tmp_path / "ref", _config(), calib=CALIB, quiet=True).record
    _assert_same_checkpoint(tmp_path / "out", tmp_path / "ref")
    assert [r["recon_error"] for r in record["layers"]] == [r["recon_error"] for r in ref["layers"]]


def _interrupted_run(monkeypatch, src: Path, work: str, n: int, **kw) -> None:
    """An in-memory run with a work dir that dies (KeyboardInterrupt) right after block ``n`` is committed."""
    real = InPlaceBlocks.release

    def release(self, i):
        real(self, i)
        if i == n:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(InPlaceBlocks, "release", release)
        with pytest.raises(KeyboardInterrupt):
            llmprune.prune(load_model(str(src))[0], None, _config(work_dir=work, **kw), calib=CALIB, quiet=True)


@pytest.mark.parametrize("extra", [
    {},
    dict(dense_targets=True),  # both activation streams are saved
    dict(pattern="unstructured", sparsity=0.6, allocation="owl", owl_lambda=0.1),  # the allocation is saved
    dict(tune_epochs=2, tune_lr=1e-3),  # tuned blocks are saved, and their tuning errors
    dict(quant="int4", group_size=32),  # the grids are saved
])
def test_in_memory_run_resumes_bit_identical(tmp_path, src, monkeypatch, extra):
    work = str(tmp_path / "work")
    _interrupted_run(monkeypatch, src, work, 1, **extra)

    resumed, _ = load_model(str(src))
    result = llmprune.prune(resumed, None, _config(work_dir=work, resume=True, **extra), calib=CALIB, quiet=True)
    record = result.record
    assert record["resumed_from"] == 2 and Path(work).exists()  # kept until the output is safe
    result.finish()
    assert not Path(work).exists()
    ref, _ = load_model(str(src))
    ref_result = llmprune.prune(ref, None, _config(**extra), calib=CALIB, quiet=True)
    ref_record = ref_result.record
    assert result.masks.keys() == ref_result.masks.keys()  # restored blocks' masks come back from the work dir
    assert all(torch.equal(result.masks[k].unpack(), ref_result.masks[k].unpack()) for k in result.masks)
    assert result.grids.keys() == ref_result.grids.keys()
    assert all(torch.equal(a, b) for k in result.grids for a, b in zip(result.grids[k], ref_result.grids[k]))
    assert record.get("allocation") == ref_record.get("allocation") and record.get("tune") == ref_record.get("tune")
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), ref.state_dict().values()))


def test_resume_refuses_a_different_run(tmp_path, src, monkeypatch):
    work = str(tmp_path / "work")
    _interrupted_run(monkeypatch, src, work, 0)

    model, _ = load_model(str(src))
    with pytest.raises(LLMPruneError, match="pass --resume"):
        llmprune.prune(model, None, _config(work_dir=work), calib=CALIB, quiet=True)
    with pytest.raises(LLMPruneError, match="plan.method: saved 'admm', now 'wanda'"):
        llmprune.prune(model, None, PruneConfig(method="wanda", pattern="2:4", batch_size=4, work_dir=work, resume=True),
                       calib=CALIB, quiet=True)
    with pytest.raises(LLMPruneError, match="calib.sha256"):
        llmprune.prune(model, None, _config(work_dir=work, resume=True), calib=CALIB.flip(0), quiet=True)
    with pytest.raises(LLMPruneError, match="needs --work-dir"):
        _config(resume=True).plan()


# Runs the CLI with the evaluation replaced by "announce, then hang", so the test can kill it mid-evaluation.
KILLED_IN_EVAL = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import llmprune.api

    def hang(*a, **k):
        print("EVALUATING", flush=True)
        time.sleep(600)

    llmprune.api.perplexity = hang
    from llmprune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow  # a subprocess run of the CLI (~5 s): in CI, not in the quick loop
def test_cli_killed_during_evaluation_loses_nothing(tmp_path, src, text_file, capsys):
    """The checkpoint is saved before the evaluation and the work dir kept until the very end: a kill during
    the evaluation, then the same command with --resume, prunes zero blocks again and saves the same bytes."""
    from llmprune.cli import main

    out, work, report = tmp_path / "out", tmp_path / "work", tmp_path / "run.json"
    argv = ["--model", str(src), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16", "--pattern", "2:4",
            "--batch-size", "4", "--work-dir", str(work), "--save", str(out), "--eval", str(text_file),
            "--eval-seqlen", "16", "--eval-windows", "2", "--report", str(report), "--quiet"]
    _kill_when(KILLED_IN_EVAL, argv, "EVALUATING")
    shards = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert shards and (work / "state.json").is_file()  # published before the evaluation, work kept

    assert main([*argv, "--resume"]) == 0
    record = json.loads(report.read_text())
    assert record["prune"]["resumed_from"] == LAYERS  # zero blocks pruned again
    assert record["ppl"]["pruned"] and not work.exists()
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == shards  # bit-identical output
    assert json.loads((out / "llmprune_run.json").read_text())["ppl"] == record["ppl"]


def test_cli_evaluation_failure_keeps_the_saved_model(tmp_path, src, text_file, monkeypatch, capsys):
    from llmprune.cli import main

    def broken(*a, **k):
        raise LLMPruneError("eval x: perplexity is not finite (the model produces NaN/Inf logits)")

    monkeypatch.setattr("llmprune.api.perplexity", broken)
    out = tmp_path / "out"
    argv = ["--model", str(src), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "16", "--pattern", "2:4",
            "--save", str(out), "--eval", str(text_file), "--eval-seqlen", "16", "--quiet"]
    assert main(argv) == 2
    assert "not finite" in capsys.readouterr().err
    assert "not finite" in json.loads((out / "llmprune_run.json").read_text())["eval_error"]
    assert llmprune.load(out) is not None
