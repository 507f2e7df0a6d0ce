"""McMahan et al. 2017, Table 2 (MNIST CNN, E=5, B=10, C=0.1, 100 clients), with litefed.

Runs each row as one ``litefed-simulate`` command (printed, so it can be
rerun by hand), then reports rounds to the target test accuracy (99%) and
the bytes moved until then, as a Markdown table plus comparison plots.

Resumable: every row writes checkpoints under OUT/<row>; running the script
again continues unfinished rows and skips finished ones (a row is finished
when it reached the target or ran its rounds). Raise --max-rounds to push a
row further.

    python scripts/bench_fedavg_paper.py --rows iid-fedavg,iid-fedavgm --out runs/paper
    python scripts/bench_fedavg_paper.py --report-only --out runs/paper
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from scriptlib import machine, package_versions

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist.npz"
PAPER = {"iid": 20, "noniid": 229}  # rounds to 99%, FedAvg CNN E=5 B=10, McMahan et al. 2017 Table 2

# The paper's setting; every row shares it and changes only what its flags say.
COMMON = ["--clients", "100", "--fraction-fit", "0.1", "--epochs", "5", "--batch-size", "10"]
PARTITIONS = {"iid": "iid", "noniid": "shards:2"}  # shards:2 = sort by label, 200 shards of 300, 2 per client
FEDAVG = ["--strategy", "fedavg", "--lr", "0.05"]


def fedavgm(lr: str = "0.05", server_lr: str = "1.0", momentum: str = "0.5") -> list[str]:
    return ["--strategy", "fedavgm", "--lr", lr, "--server-lr", server_lr, "--server-momentum", momentum]


FEDAVGM = fedavgm()
ROWS: dict[str, tuple[str, list[str], str]] = {
    # name: (partition, flags, what it shows). Compression is measured on the faster FedAvgM setting.
    "iid-fedavg": ("iid", FEDAVG, "FedAvg, as in the paper"),
    "iid-fedavg-lr0.1": ("iid", ["--strategy", "fedavg", "--lr", "0.1"], "FedAvg, client lr 0.1"),
    "iid-fedavgm": ("iid", FEDAVGM, "server momentum 0.5"),
    "iid-fedavgm-int8": ("iid", [*FEDAVGM, "--codec", "int8-channel"], "FedAvgM, int8 updates"),
    "iid-fedavgm-topk": ("iid", [*FEDAVGM, "--codec", "topk:0.1"], "FedAvgM, top-10% updates + error feedback"),
    "iid-fedavgm-lr0.1": ("iid", fedavgm(lr="0.1"), "server momentum 0.5, client lr 0.1"),
    "noniid-fedavg": ("noniid", FEDAVG, "FedAvg, as in the paper"),
    "noniid-fedavgm": ("noniid", FEDAVGM, "server momentum 0.5"),
    "noniid-fedavgm-m0.9": ("noniid", fedavgm(server_lr="0.2", momentum="0.9"), "server momentum 0.9, server lr 0.2"),
    "noniid-fedavgm-decay": ("noniid", [*FEDAVGM, "--lr-decay", "0.99"], "server momentum 0.5, client lr x0.99/round"),
    "noniid-fedavgm-lr0.1-decay": (
        "noniid",
        [*fedavgm(lr="0.1"), "--lr-decay", "0.98"],
        "server momentum 0.5, client lr 0.1 x0.98/round",
    ),
}


def command(row: str, args: argparse.Namespace) -> list[str]:
    partition, flags, _ = ROWS[row]
    rounds = args.max_rounds or (100 if partition == "iid" else 400)
    return [
        sys.executable,
        "-m",
        "coordinator.cli.simulate",
        *COMMON,
        "--partition",
        PARTITIONS[partition],
        *flags,
        "--data",
        str(args.data),
        "--rounds",
        str(rounds),
        "--target-accuracy",
        str(args.target),
        "--workers",
        str(args.workers),
        "--seed",
        str(args.seed),
        "--no-progress",
        "--out",
        str(args.out / row),
    ]


def read_metrics(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(row: str, records: list[dict], target: float) -> dict:
    partition, flags, what = ROWS[row]
    reached = next((r for r in records if (r.get("test_accuracy") or 0) >= target), None)
    upto = [r for r in records if reached is None or r["round"] <= reached["round"]]
    return {
        "row": row,
        "partition": partition,
        "what": what,
        "flags": " ".join(flags),
        "rounds_run": len(records),
        "rounds_to_target": reached["round"] if reached else None,
        "best_accuracy": max((r.get("test_accuracy") or 0 for r in records), default=None),
        "bytes_up": sum(r["bytes_in"] for r in upto),
        "bytes_down": sum(r["bytes_out"] for r in upto),
        "seconds": sum(r["round_seconds"] for r in upto),
        "paper_rounds": PAPER[partition] if flags == FEDAVG else None,
    }


def report(rows: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"| row | partition | what | rounds to {args.target:.0%} | paper | best acc (rounds run) "
        "| MB up | MB down | sim time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = []
    for row in rows:
        s = summary(row, read_metrics(args.out / row), args.target)
        results.append(s)
        reached = str(s["rounds_to_target"]) if s["rounds_to_target"] else f"not reached in {s['rounds_run']}"
        best = f"{s['best_accuracy']:.4f} ({s['rounds_run']})" if s["best_accuracy"] is not None else "-"
        lines.append(
            f"| {row} | {s['partition']} | {s['what']} | {reached} | {s['paper_rounds'] or '-'} | {best} "
            f"| {s['bytes_up'] / 1e6:,.0f} | {s['bytes_down'] / 1e6:,.0f} | {s['seconds'] / 60:.1f} min |"
        )
    (args.out / "results.json").write_text(json.dumps({"rows": results, "machine": machine()}, indent=2))
    return "\n".join(lines)


def plots(rows: list[str], args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from coordinator.plots import plot_accuracy_vs_bytes, plot_rounds

    for partition in PARTITIONS:
        runs = {r: read_metrics(args.out / r) for r in rows if ROWS[r][0] == partition}
        runs = {k: v for k, v in runs.items() if v}
        if runs:
            title = f"MNIST CNN, 100 clients, C=0.1, E=5, B=10, {partition}"
            zoom = (0.95, 1.0)  # the race to 99%, not the first rounds' climb
            path = plot_rounds(runs, args.out / f"{partition}.png", title, target=args.target, accuracy_range=zoom)
            print("plot:", path)
            path = args.out / f"{partition}-bytes.png"
            cost = plot_accuracy_vs_bytes(runs, path, f"Upload cost, {partition}", args.target, accuracy_range=zoom)
            print("plot:", cost)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {','.join(ROWS)})")
    p.add_argument("--out", type=Path, default=Path("runs/paper"), help="output directory (default %(default)s)")
    p.add_argument("--data", type=Path, default=SHARED_MNIST, help="full MNIST, Keras format (default %(default)s)")
    p.add_argument("--max-rounds", type=int, help="rounds per row (default 100 IID, 400 non-IID)")
    p.add_argument("--target", type=float, default=0.99, help="test accuracy to reach (default %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="client processes (default: cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of partition, sampling and shuffling (default 0)")
    p.add_argument("--report-only", action="store_true", help="only report what OUT holds")
    args = p.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if not args.report_only and not args.data.is_file():
        p.error(f"{args.data} not found: pass --data with the full MNIST (Keras mnist.npz)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"machine": machine(), "versions": package_versions("ai-edge-litert", "numpy")}))
    for row in [] if args.report_only else rows:
        done = summary(row, read_metrics(args.out / row), args.target)
        if done["rounds_to_target"] is not None or (args.max_rounds and done["rounds_run"] >= args.max_rounds):
            print(f"\n## {row}: finished earlier ({done['rounds_run']} rounds), skipped")
            continue
        cmd = command(row, args)
        print(f"\n## {row}\n$ " + shlex.join(cmd).replace(sys.executable, "python"), flush=True)
        began = time.monotonic()
        with open(args.out / f"{row}.log", "a") as log:
            code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        print(f"exit {code} after {time.monotonic() - began:.0f} s (log: {args.out / row}.log)", flush=True)
        if code not in (0,):
            print(f"row {row} failed; see its log", file=sys.stderr)
            return code
    print("\n" + report(rows, args))
    plots(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
