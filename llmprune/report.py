"""Run records (JSON) and the stdout summary table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    import transformers

    from . import __version__

    return {
        "llmprune": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": machine(),
    }


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()} ({platform.system()})"


def git_commit() -> str:
    # LLMPRUNE_COMMIT names the commit of a copied tree (e.g. shipped to a GPU machine), whose .git may be stale or absent
    if os.environ.get("LLMPRUNE_COMMIT"):
        return os.environ["LLMPRUNE_COMMIT"]
    try:
        # "-dirty" marks results of uncommitted code
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over, so no half-written file exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary(record: dict[str, Any]) -> str:
    """The table printed at the end of a CLI run."""
    cfg, prune = record["config"], record.get("prune", {})
    rows = [["method", cfg["method"]], ["pattern", cfg["pattern"]], ["sparsity (measured)", prune.get("sparsity", 0.0)]]
    for name, ppl in record.get("ppl", {}).get("dense", {}).items():
        rows.append([f"ppl {name} dense", ppl])
    for name, ppl in record.get("ppl", {}).get("pruned", {}).items():
        rows.append([f"ppl {name} pruned", ppl])
    errs = [layer["recon_error"] for layer in prune.get("layers", [])]
    if errs:
        rows.append(["mean layer recon error", sum(errs) / len(errs)])
    for phase, sec in record.get("seconds", {}).items():
        rows.append([f"seconds {phase}", float(sec)])
    return markdown_table(["", "value"], rows)


def print_summary(record: dict[str, Any]) -> None:
    print(summary(record), file=sys.stdout, flush=True)
