"""Zero-shot accuracy through lm-evaluation-harness (its Python API and HF model wrapper, on the model in
memory), the numbers pruning papers report beside perplexity: BoolQ, RTE, HellaSwag, WinoGrande,
ARC-e/c, OBQA (``boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa``).

Named tasks download their datasets from the Hugging Face hub. A task of your own is a YAML file in a
folder passed as ``include_path`` (lm-eval's local task definitions), e.g. a ``json`` dataset by path.
Tasks are loaded once, before any pruning, so a bad name or unreachable data fails at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import LLMPruneError
from .eval import on_device
from .engine.plan import resolve_device

METRICS = ("acc", "acc_norm")


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise LLMPruneError("zero-shot tasks need lm-evaluation-harness: pip install 'lm_eval>=0.4.9'") from e
    return lm_eval


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None) -> Any:
    """lm-eval's task index (it reads every task YAML it ships: seconds), once per process and folder."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=include_path)


def load_tasks(tasks: Sequence[str], include_path: str | None = None) -> dict[str, Any]:
    """lm-eval task objects by name, with their data; a one-line error for unknown names or missing data."""
    from lm_eval.tasks import get_task_dict

    manager = _manager(include_path)
    if unknown := [t for t in tasks if t not in manager.all_tasks]:
        raise LLMPruneError(f"unknown lm-eval task(s) {', '.join(unknown)} (local task YAMLs go in a folder "
                            "given as --eval-tasks-include)")
    try:
        return get_task_dict(list(tasks), manager)
    except Exception as e:  # noqa: BLE001 — datasets raises many kinds (offline, not found, bad file)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LLMPruneError(f"cannot load the data of task(s) {', '.join(tasks)}: {type(e).__name__}: {first} "
                            "(named tasks download their datasets from the Hugging Face hub, which needs the "
                            "network)") from e


def zero_shot(model: nn.Module, tokenizer: Any, tasks: Sequence[str] | dict[str, Any], batch_size: int = 8,
              limit: int | None = None, device: str = "auto", include_path: str | None = None, seed: int = 0,
              quiet: bool = False) -> dict[str, dict[str, float]]:
    """Zero-shot ``acc`` (and ``acc_norm`` where the task has it, with their stderr) per task, plus the
    number of documents scored; ``tasks`` are names or what :func:`load_tasks` returned; ``limit`` caps
    the documents per task."""
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    task_dict = tasks if isinstance(tasks, dict) else load_tasks(tasks, include_path)
    dev = resolve_device(device)
    with on_device(model, dev):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(dev))
        out = simple_evaluate(model=lm, tasks=list(task_dict.values()), num_fewshot=0, limit=limit,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=1000)
    results: dict[str, dict[str, float]] = {}
    for name, metrics in out["results"].items():
        row = {m: float(metrics[f"{m},none"]) for m in METRICS if f"{m},none" in metrics}
        row.update({f"{m}_stderr": float(metrics[f"{m}_stderr,none"]) for m in METRICS
                    if isinstance(metrics.get(f"{m}_stderr,none"), (int, float))})
        row["docs"] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        results[name] = row
    return results
