"""Run records (JSON) and the stdout summary table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

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


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path``, fsync it, rename it over ``path``: no reader ever sees a
    half-written file, and after a crash the file is the old one or the new one. Mode 0644 (umask applied)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON through :func:`write_atomic`."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str)))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary(record: dict[str, Any]) -> str:
    """The table printed at the end of a CLI run."""
    cfg, prune = record["config"], record.get("prune", {})
    rows = [["method", cfg["method"]], ["pattern", cfg["pattern"]], ["sparsity (measured)", prune.get("sparsity", 0.0)],
            ["targets pruned", prune.get("targets", 0)]]
    if "sparsity_block_weights" in prune:
        rows.append(["sparsity over all block weights", prune["sparsity_block_weights"]])
    if experts := prune.get("experts"):
        rows += [["expert matrices pruned", experts["targets"]],
                 ["tokens per expert (min / median / max)",
                  f"{experts['tokens_min']} / {experts['tokens_median']} / {experts['tokens_max']}"],
                 [f"experts by magnitude (< {experts['min_tokens']} tokens)", experts["magnitude_fallback"]]]
    if dense := prune.get("not_pruned"):
        rows.append(["left dense (>= 1% of a block)", f"{len(dense)}: {dense[0]['name']}" + (", ..." if len(dense) > 1 else "")])
    if cfg.get("skip"):
        rows.append(["skipped (--skip)", ", ".join(cfg["skip"])])
    for name, ppl in record.get("ppl", {}).get("dense", {}).items():
        rows.append([f"ppl {name} dense", ppl])
    for name, ppl in record.get("ppl", {}).get("pruned", {}).items():
        rows.append([f"ppl {name} pruned", ppl])
    for phase, results in record.get("zero_shot", {}).items():
        for task, metrics in results.items():
            rows.append([f"zero-shot {task} {phase} (acc_norm or acc)", metrics.get("acc_norm", metrics.get("acc"))])
    errs = [layer["recon_error"] for layer in prune.get("layers", [])]
    if errs:
        rows.append(["mean layer recon error", sum(errs) / len(errs)])
    for phase, sec in record.get("seconds", {}).items():
        rows.append([f"seconds {phase}", float(sec)])
    return markdown_table(["", "value"], rows)


def print_summary(record: dict[str, Any]) -> None:
    print(summary(record), file=sys.stdout, flush=True)
