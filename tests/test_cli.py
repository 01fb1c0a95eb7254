"""The CLI: bad input gets one line on stderr and a non-zero exit; a good run writes a record."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llmprune.cli import main

from .conftest import SHARED_DATA


def _fails(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llmprune: error:"), err
    assert match in err, err


def _tiny(d, *extra: str) -> list[str]:
    return ["--model", str(d), "--nsamples", "4", "--seqlen", "16", "--quiet", *extra]


def test_missing_model_path(capsys, text_file):
    _fails(capsys, ["--model", "./no/such/model", "--calib", str(text_file), "--quiet"], "model not found")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_range(capsys, value):
    _fails(capsys, ["--sparsity", value, "--quiet"], "sparsity must be in [0, 1)")


def test_nm_with_other_sparsity(capsys):
    _fails(capsys, ["--pattern", "2:4", "--sparsity", "0.7", "--quiet"], "implies sparsity 0.5")


def test_method_option_of_another_method(capsys):
    _fails(capsys, ["--method", "wanda", "--admm-rho", "2", "--quiet"], "--admm-rho applies to --method admm")


def test_tile_on_indivisible_dimension(capsys, tmp_path, tokenizer, text_file):
    from .conftest import tiny_model

    tiny_model(intermediate_size=130).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _fails(capsys, _tiny(tmp_path, "--pattern", "4x4:8", "--calib", str(text_file)), "not divisible by the 4x4 tiles")


def test_empty_calibration_file(capsys, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _fails(capsys, _tiny(tiny_model_dir, "--calib", str(empty)), "is empty")


def test_text_shorter_than_one_window(capsys, tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("the of and to in")
    _fails(capsys, _tiny(tiny_model_dir, "--calib", str(short)), "fewer than one window")


def test_unknown_dataset_offline(capsys, tiny_model_dir):
    _fails(capsys, _tiny(tiny_model_dir, "--calib", "nosuchset"), "no such dataset")


def test_named_dataset_offline_without_data_dir(capsys, tiny_model_dir):
    _fails(capsys, _tiny(tiny_model_dir, "--calib", "ptb"), "--calib ptb: no --data-dir/$LLMPRUNE_DATA, and offline")


def test_save_refuses_existing_dir(capsys, tmp_path, tiny_model_dir, text_file):
    (tmp_path / "out").mkdir()
    _fails(capsys, _tiny(tiny_model_dir, "--calib", str(text_file), "--save", str(tmp_path / "out")), "--overwrite")


def test_full_run_writes_record_and_checkpoint(capsys, tmp_path, tiny_model_dir, text_file):
    report, out = tmp_path / "run.json", tmp_path / "out"
    argv = _tiny(tiny_model_dir, "--calib", str(text_file), "--pattern", "2:4", "--eval", str(text_file),
                 "--eval-seqlen", "32", "--eval-windows", "4", "--eval-dense", "--report", str(report), "--save", str(out))
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "ppl" in stdout and "| method | admm |" in stdout
    record = json.loads(report.read_text())
    assert record["config"]["sparsity"] == 0.5 and record["prune"]["sparsity"] == pytest.approx(0.5)
    assert set(record["ppl"]) == {"dense", "pruned"}
    assert all(0 <= layer["recon_error"] < 1 for layer in record["prune"]["layers"])
    assert {"load", "prune", "eval", "save"} <= set(record["seconds"])
    assert json.loads((out / "llmprune_run.json").read_text())["config"]["pattern"] == "2:4"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask  # readable by a server running as another user
    assert (report.stat().st_mode & 0o777) == 0o666 & ~umask
    assert "| targets pruned | 14 |" in stdout
    card = (out / "README.md").read_text()  # the model card, with this run's evaluation
    assert card.startswith("---\nlibrary_name: transformers\n") and "- 2:4" in card
    assert "with `admm`, calibrated on 4 windows of 16 tokens" in card
    assert f"| {text_file} | {record['ppl']['dense'][str(text_file)]:.4g} | {record['ppl']['pruned'][str(text_file)]:.4g} |" in card


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_data_dir_env_var_is_read(capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_DATA", str(SHARED_DATA))
    assert main(_tiny(tiny_model_dir, "--method", "magnitude", "--calib", "wikitext2")) == 0


def test_exit_code_through_python_m():
    proc = subprocess.run([sys.executable, "-m", "llmprune", "--pattern", "3:2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["llmprune: error: pattern 3:2: need 0 < N <= M"]


def test_stream_needs_save(capsys, tiny_model_dir, text_file):
    _fails(capsys, _tiny(tiny_model_dir, "--stream", "--calib", str(text_file)), "--stream needs --save")


def test_streamed_run_saves_a_checkpoint_that_inspects_clean(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "streamed"
    assert main(_tiny(tiny_model_dir, "--stream", "--calib", str(text_file), "--pattern", "2:4", "--save", str(out))) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "2:4" in capsys.readouterr().out
    assert json.loads((out / "llmprune_run.json").read_text())["config"]["stream"] is True


def test_help_lists_generated_method_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--admm-rho-start" in out and "--sparsegpt-blocksize" in out and "--resume" in out


def test_owl_run_saves_per_layer_sparsities_that_inspect_clean(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "owl"
    argv = _tiny(tiny_model_dir, "--calib", str(text_file), "--sparsity", "0.6", "--allocation", "owl",
                 "--owl-lambda", "0.1", "--save", str(out))
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0  # every layer verified against its own declared sparsity
    sc = json.loads((out / "config.json").read_text())["sparsity_config"]
    record = json.loads((out / "llmprune_run.json").read_text())["prune"]
    assert sc["pattern"] == "mixed" and sc["global_sparsity"] == pytest.approx(0.6, abs=0.02)
    assert sorted({entry["sparsity"] for entry in sc["layers"].values()}) == sorted(set(record["allocation"]["sparsity"]))


def test_owl_with_nm_pattern_is_refused(capsys, tiny_model_dir):
    _fails(capsys, _tiny(tiny_model_dir, "--pattern", "2:4", "--allocation", "owl"), "needs unstructured sparsity")


def test_llmprune_commit_names_the_commit_of_a_copied_tree(monkeypatch):
    from llmprune.report import environment

    monkeypatch.setenv("LLMPRUNE_COMMIT", "abc1234")
    assert environment()["commit"] == "abc1234"


def test_quantized_run_saves_a_packed_checkpoint_that_inspects_clean(capsys, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "int4"
    argv = _tiny(tiny_model_dir, "--calib", str(text_file), "--pattern", "2:4", "--quant", "int4", "--group-size", "32",
                 "--sym", "--save", str(out))
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "2:4+int4g32s" in capsys.readouterr().out
    sc = json.loads((out / "config.json").read_text())["sparsity_config"]
    assert sc["layout"] == "sparse-24-bitmask+int4" and sc["quant"] == {"bits": 4, "group_size": 32, "symmetric": True}
    assert json.loads((out / "llmprune_run.json").read_text())["prune"]["quant"]["bits"] == 4


@pytest.mark.parametrize("extra,match", [
    (["--pattern", "2:4", "--quant", "int4", "--group-size", "6"], "multiple of pattern 2:4's group width 4"),
    (["--method", "gptq"], "gptq quantizes"),
    (["--quant", "int4", "--finetune-tokens", "64"], "off the --quant grid"),
    (["--quant", "int3"], "invalid choice"),
])
def test_impossible_quantization_is_refused(capsys, tiny_model_dir, extra, match):
    _fails(capsys, _tiny(tiny_model_dir, *extra), match)
