"""benchmarks/device_run.py proven on the CPU (issue #12): every stage runs at tiny shapes, so a Python
error can never cost device minutes; and the budget logic skips what does not fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_run.py"


def _run(out: Path, *flags: str) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *flags], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "device_run.json").read_text())


@pytest.mark.slow  # ~40 s on 2 cores: in CI (which runs the slow tests), not in the quick loop
def test_dry_run_every_stage(tmp_path: Path) -> None:
    record = _run(tmp_path, "--dry-run", "--budget", "500")
    stages = record["stages"]
    assert list(stages) == ["gpu_tests", "kernels", "e2e_decode", "cusparselt_tests", "cusparselt_kernels", "scale_tiny"]
    assert all(s["status"] == "ok" for s in stages.values()), {k: s.get("tail") for k, s in stages.items()}
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert all(r.get("ok", True) for r in rows) and all(r["device"] and r["commit"] for r in rows)
    layer = [r for r in rows if not r.get("e2e")]
    assert {r["kernel"] for r in layer} >= {"copy", "cublas", "triton", "dense", "triton_int4"} and layer[0]["kernel"] == "copy"
    assert {r["format"] for r in layer if r["kernel"] == "triton_int4"} == {"int4", "2:4+int4"}
    assert {r["format"] for r in rows if r.get("e2e")} == {"dense", "2:4", "4x4:8", "int4", "2:4+int4"}
    assert json.loads((tmp_path / "dispatch.json").read_text())  # a dispatch table derived from the grid
    (scale,) = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert scale["sparsity"] == pytest.approx(0.5) and scale["blocks"] == scale["blocks_total"]
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool returns at most 8 files


def test_budget_skips_what_does_not_fit(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_run"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--dry-run", "--budget", "12", "--only", "kernels,cusparselt_kernels"]) == 0
    record = json.loads((tmp_path / "device_run.json").read_text())
    kernels = record["stages"]["kernels"]
    assert kernels["status"] == "skipped" and kernels["why"].endswith("s left of the budget")
    assert record["stages"]["cusparselt_kernels"]["status"] == "skipped"
    assert "gpu_tests" not in record["stages"] and not (tmp_path / "kernels.json").exists()
