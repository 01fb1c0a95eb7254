"""The loss and validation curves of a fine-tuning run as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io
from typing import Any


def plot_curves(record: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(range(1, len(record["loss"]) + 1), record["loss"], label="train loss (per step)", lw=1)
    if record["val"]:
        ax.plot([v["step"] for v in record["val"]], [v["loss"] for v in record["val"]], "o-",
                label="validation cross-entropy")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(f"finetune {record.get('config', {}).get('mode', '')}")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
