"""The README's result tables are generated from benchmarks/results/*.json: one that disagrees fails CI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_agree_with_their_json() -> None:
    assert _tables().main(["--check"]) == 0, "run python benchmarks/tables.py"


def test_a_changed_number_is_caught(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "| **admm** (ours, defaults) | **32.59** |" in readme
    edited = tmp_path / "README.md"
    edited.write_text(readme.replace("| **admm** (ours, defaults) | **32.59** |", "| **admm** (ours, defaults) | **31.59** |"))
    assert _tables().main(["--check", "--readme", str(edited)]) == 1
