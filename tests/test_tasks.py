"""Zero-shot accuracy through lm-evaluation-harness, offline: a local multiple-choice task the test writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from llmprune import LLMPruneError, zero_shot  # noqa: E402
from llmprune.cli import main  # noqa: E402
from llmprune.tasks import load_tasks  # noqa: E402

from .conftest import tiny_model  # noqa: E402

TASK = """\
task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Four documents whose two choices are the same text, so both score alike and lm-eval picks the first:
    gold 0 in three of them makes the accuracy exactly 0.75, whatever the model."""
    d = tmp_path_factory.mktemp("tasks")
    docs = [{"question": "the of and", "choices": ["to in", "to in"], "label": 0}] * 3
    docs.append({"question": "was for on", "choices": ["is a", "is a"], "label": 1})
    (d / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (d / "tiny.yaml").write_text(TASK.format(docs=d / "docs.jsonl"))
    return d


def test_local_task_accuracy_is_computed(task_dir, tokenizer):
    result = zero_shot(tiny_model(), tokenizer, ["tiny_choice"], batch_size=2, include_path=str(task_dir))
    assert result["tiny_choice"]["acc"] == 0.75 and result["tiny_choice"]["docs"] == 4
    assert result["tiny_choice"]["acc_stderr"] == pytest.approx(0.25)


def test_unknown_and_unreachable_tasks_fail_in_one_line(task_dir):
    with pytest.raises(LLMPruneError, match="unknown lm-eval task"):
        load_tasks(["no_such_task"], str(task_dir))
    with pytest.raises(LLMPruneError, match="cannot load the data of task") as e:
        load_tasks(["arc_easy"], str(task_dir))  # offline: the hub dataset cannot be fetched
    assert "\n" not in str(e.value)


def test_cli_records_dense_and_pruned_accuracy(capsys, tmp_path, tiny_model_dir, text_file, task_dir):
    report, out = tmp_path / "run.json", tmp_path / "out"
    argv = ["--model", str(tiny_model_dir), "--nsamples", "4", "--seqlen", "16", "--quiet", "--calib", str(text_file),
            "--pattern", "2:4", "--eval-tasks", "tiny_choice", "--eval-tasks-include", str(task_dir), "--eval-dense",
            "--report", str(report), "--save", str(out)]
    assert main(argv) == 0
    record = json.loads(report.read_text())
    assert record["zero_shot"]["dense"]["tiny_choice"]["acc"] == record["zero_shot"]["pruned"]["tiny_choice"]["acc"] == 0.75
    assert "zero-shot tiny_choice pruned" in capsys.readouterr().out
    assert "| tiny_choice | 0.7500 | 0.7500 | 4 |" in (out / "README.md").read_text()
    assert main([*argv[:-2], "--eval-tasks", "nope", "--save", str(tmp_path / "o2")]) == 2  # before any work
    assert not (tmp_path / "o2").exists()
