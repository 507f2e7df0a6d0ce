"""PNG plots of per-round metrics (test accuracy and loss), one line per run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from coordinator.errors import MissingExtraError
from edge_client.cli_support import EXIT_OK, command, fail


def plot_rounds(
    runs: Mapping[str, Sequence[dict]],
    out: Path,
    title: str = "",
    target: float | None = None,
    accuracy_range: tuple[float, float] | None = None,
) -> Path:
    """Plot test accuracy (left) and test/train loss (right) per round.

    ``runs`` maps a label to the run's metrics records (the lines of its
    ``metrics.jsonl``). Several runs share the axes, e.g. IID vs non-IID.
    ``accuracy_range`` zooms the accuracy axis, e.g. ``(0.95, 1.0)`` to see
    which run reaches 99% first rather than the first rounds' climb.
    """
    plt = _pyplot()
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
    _mark_target(acc_ax, target, accuracy_range)
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="Test accuracy")
    loss_ax.set(xlabel="round", ylabel="loss", title="Loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def plot_accuracy_vs_bytes(
    runs: Mapping[str, Sequence[dict]],
    out: Path,
    title: str = "",
    target: float | None = None,
    accuracy_range: tuple[float, float] | None = None,
) -> Path:
    """Test accuracy against the cumulative megabytes clients uploaded: the cost of each run's codec."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, records in runs.items():
        uploaded, points = 0, []
        for r in records:
            uploaded += r.get("bytes_in") or 0
            if r.get("test_accuracy") is not None:
                points.append((uploaded / 1e6, r["test_accuracy"]))
        if points:
            ax.plot(*zip(*points, strict=True), ".-", label=label)
    _mark_target(ax, target, accuracy_range)
    ax.set(xscale="log", xlabel="MB uploaded by clients (cumulative)", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize="small")
    return _save(fig, out)


def _mark_target(ax, target: float | None, accuracy_range: tuple[float, float] | None) -> None:
    """The target accuracy as a dotted line, and the accuracy axis zoomed to ``accuracy_range`` if given."""
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    if accuracy_range is not None:
        ax.set_ylim(accuracy_range)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # an edge-only install: plots are the coordinator's
        raise MissingExtraError("plotting", "matplotlib", "coordinator") from exc

    matplotlib.use("Agg")  # files only: no display on servers and boards
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


@command
def main(argv: Sequence[str] | None = None) -> int:
    """``litefed-plot``: compare runs (their ``metrics.jsonl``) in one PNG."""
    import argparse

    from coordinator.metrics import read_jsonl

    prog = "litefed-plot"
    p = argparse.ArgumentParser(
        prog=prog,
        description="Plot test accuracy and loss per round of one or more runs on shared axes.",
        epilog="example: litefed-plot runs/iid runs/noniid --label IID --label non-IID --out compare.png",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or their metrics.jsonl files)")
    p.add_argument("--label", action="append", help="legend label, once per run (default: the directory name)")
    p.add_argument("--out", type=Path, default=Path("compare.png"), help="PNG to write (default %(default)s)")
    p.add_argument("--title", default="", help="figure title")
    args = p.parse_args(argv)
    try:
        _pyplot()  # before reading any run: a missing matplotlib is the first thing to fix
    except MissingExtraError as exc:
        return fail(prog, exc)
    labels = args.label or [run.name if run.is_dir() else run.parent.name for run in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"{len(labels)} --label for {len(args.runs)} runs; give one per run or none")
    runs = {}
    for label, run in zip(labels, args.runs, strict=True):
        path = run / "metrics.jsonl" if run.is_dir() else run
        if not path.is_file():
            return fail(prog, f"{path} not found (expected a run directory with metrics.jsonl)")
        runs[label] = read_jsonl(path)
    print(plot_rounds(runs, args.out, args.title))
    return EXIT_OK


if __name__ == "__main__":
    import sys

    sys.exit(main())
