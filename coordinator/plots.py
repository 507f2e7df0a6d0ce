"""PNG plots of per-round metrics (test accuracy and loss), one line per run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_rounds(runs: Mapping[str, Sequence[dict]], out: Path, title: str = "") -> Path:
    """Plot test accuracy (left) and test/train loss (right) per round.

    ``runs`` maps a label to the run's metrics records (the lines of its
    ``metrics.jsonl``). Several runs share the axes, e.g. IID vs non-IID.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and boards
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (label, records) in enumerate(runs.items()):
        color = f"C{index % 10}"  # one colour per run in both panels
        rounds = [r["round"] for r in records]
        accuracy = [r.get("test_accuracy") for r in records]
        if any(a is not None for a in accuracy):
            acc_ax.plot(
                rounds, [a if a is not None else float("nan") for a in accuracy], ".-", color=color, label=label
            )
        for key, style in (("test_loss", "-"), ("train_loss", "--")):
            values = [r.get(key) for r in records]
            if any(v is not None for v in values):
                loss_ax.plot(
                    rounds,
                    [v if v is not None else float("nan") for v in values],
                    style,
                    color=color,
                    label=f"{label} ({key.split('_')[0]})",
                )
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="Test accuracy")
    loss_ax.set(xlabel="round", ylabel="loss", title="Loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
