"""Training curves as PNG: people read a curve faster than a log."""

from __future__ import annotations

import json
from pathlib import Path


def plot_pretrain_log(log_path: str | Path, out_png: str | Path) -> Path:
    """Validation QA accuracy (overall and per type) and perplexity against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in Path(log_path).read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, [r["qa_accuracy"] for r in rows], "k-", lw=2.5, label="all")
    kinds = sorted({k for r in rows for k in r.get("qa_accuracy_by_type", {})})
    for k in kinds:
        ax1.plot(
            steps, [r["qa_accuracy_by_type"].get(k, float("nan")) for r in rows], lw=1, label=k
        )
    ax1.set(xlabel="step", ylabel="val QA accuracy (greedy exact match)", ylim=(0, 1.02))
    ax1.legend(fontsize=7, ncol=2)
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r["perplexity"] for r in rows], label="all target tokens")
    ax2.plot(steps, [r["perplexity_content"] for r in rows], label="answer words")
    ax2.set(xlabel="step", ylabel="val perplexity", yscale="log")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
