#!/usr/bin/env python
"""Benchmark the per-round overhead of a federation of 10 emulated clients.

Issue 3 asks how much of a federated round is *not* local training: publishing
the global model, the round announcement, chunk transfer of the global model
and of the updates, decoding, validating and aggregating the updates,
evaluating the new global model on the held-out set (1,000 bundled MNIST test
images) and writing the checkpoint.

This script runs, as a subprocess, from the repository root::

    python -m coordinator.cli.emulate --clients N --rounds R --partition iid --out DIR \\
        --no-progress --round-timeout 300 --lr 0.05 [pass-through options]

(the built-in MNIST CNN, converted on first use and cached in
``~/.cache/litefed/models`` or ``$LITEFED_CACHE``; the bundled 6,000 MNIST
training images split iid among the clients; one local epoch per round), then
reads ``DIR/metrics.jsonl`` and reports, per round:

- ``round_seconds``: coordinator wall time of the round, from publishing the
  global weights to the checkpoint (round 1 also waits for the client
  processes to start and connect);
- ``slowest_client_seconds``: the longest local training time a client
  reported that round (``train_seconds`` in its update: set_weights + fit +
  get_weights);
- ``overhead = round_seconds - slowest_client_seconds``, split into the
  coordinator's own ``aggregate_seconds`` (FedAvg finish: mean + apply_delta)
  and ``evaluate_seconds`` and the rest;
- bytes in/out counted by the coordinator, and the test accuracy.

The median overhead leaves out round 1, which also contains the start-up of
the client processes (Python + LiteRT imports, MQTT connect), the download of
the 6.8 MB model by every client and first-touch effects (page faults, lazy
initialisation of the interpreters).

Best effort, from the timestamps of the coordinator's and clients' logs (one
machine, one clock), it also shows *when* within each round the last client
had the global weights, began training, finished (update encoded and saved),
and received the coordinator's ack of its update.

On a 2-core machine the N client processes (1 LiteRT thread each) share the
2 cores with the coordinator and the broker, so local training is ~N/2 times
slower than on a board of its own; the overhead is what is not training.

Prints a table and the exact commands, writes ``--json`` (default
``build/bench/bench_round_overhead.json``) and the emulation's output to
``DIR/emulate.log``. Exits 0 when the emulation completed (whatever the
numbers), else with the emulation's exit status.

Run from the repository root:  python scripts/bench_round_overhead.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from scriptlib import machine, package_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "build/bench/round_overhead"
DEFAULT_JSON = "build/bench/bench_round_overhead.json"
# Files an emulation writes into --out: only a directory holding nothing else is removed before a run.
EMULATION_ENTRIES = {"metrics.jsonl", "metrics.png", "checkpoints", "clients", "emulate.log"}

_TS = r"(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
COORD_ANNOUNCED = re.compile(_TS + r" .*round (?P<round>\d+): selected")  # attempt 1; retries say "asking"
COORD_ACCEPTED = re.compile(_TS + r" .*round (?P<round>\d+): update from \S+ accepted")
CLIENT_GLOBAL = re.compile(_TS + r" .*global weights of round (?P<round>\d+) received")
CLIENT_TRAINING = re.compile(_TS + r" .*round (?P<round>\d+): training on")
CLIENT_TRAINED = re.compile(_TS + r" .*round (?P<round>\d+): trained in (?P<secs>[\d.]+) s")
CLIENT_ACKED = re.compile(_TS + r" .*round (?P<round>\d+): update (accepted|duplicate) by the coordinator")


def _ts(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


# -- running the emulation -----------------------------------------------------------
def prepare_out(out: Path) -> None:
    """Start from an empty DIR: the coordinator would resume from an old checkpoint and append to metrics.jsonl."""
    if not out.exists():
        return
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    if entries <= EMULATION_ENTRIES:
        print(f"== removing the previous emulation output in {out}", flush=True)
        shutil.rmtree(out)
        return
    raise SystemExit(
        f"{out} holds files that are not an emulation's output ({sorted(entries - EMULATION_ENTRIES)}); "
        "choose another --out"
    )


def emulate_command(args, passthrough: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "coordinator.cli.emulate",
        "--clients", str(args.clients),
        "--rounds", str(args.rounds),
        "--partition", args.partition,
        "--out", str(args.out),
        "--no-progress",
        "--round-timeout", f"{args.round_timeout:g}",
        "--lr", f"{args.lr:g}",
        *passthrough,
    ]  # fmt: skip


def run_emulation(cmd: list[str], log_path: Path, quiet: bool) -> tuple[int, float, list[str]]:
    """Run the emulation, tee its output to log_path; return (exit status, wall seconds, output lines)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    lines: list[str] = []
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            lines.append(line.rstrip("\n"))
            if not quiet:
                print("  | " + line, end="", flush=True)
        code = proc.wait()
    return code, time.perf_counter() - t0, lines


# -- reading the results -------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def per_round(records: list[dict]) -> list[dict]:
    rows = []
    for m in records:
        slowest = m.get("slowest_client_seconds")
        overhead = None if slowest is None else m["round_seconds"] - slowest
        rest = None if overhead is None else overhead - m.get("aggregate_seconds", 0.0) - m.get("evaluate_seconds", 0.0)
        rows.append(
            {
                "round": m["round"],
                "clients": f"{m.get('clients_answered')}/{m.get('clients_selected')}",
                "attempts": m.get("attempts", 1),
                "round_seconds": m["round_seconds"],
                "slowest_client_seconds": slowest,
                "overhead_seconds": overhead,
                "aggregate_seconds": m.get("aggregate_seconds"),
                "evaluate_seconds": m.get("evaluate_seconds"),
                "other_overhead_seconds": rest,
                "bytes_in": m.get("bytes_in"),
                "bytes_out": m.get("bytes_out"),
                "test_accuracy": m.get("test_accuracy"),
                "test_loss": m.get("test_loss"),
                "train_loss": m.get("train_loss"),
                "clients_rejected": m.get("clients_rejected", 0),
            }
        )
    return rows


def timeline(out: Path, lines: list[str], rows: list[dict]) -> dict[int, dict]:
    """Per round, seconds after the round's start (= the round-summary log line - round_seconds), from log times."""
    coord: dict[str, dict[int, list[float]]] = {"announced": {}, "accepted": {}}
    for line in lines:
        for key, pattern in (("announced", COORD_ANNOUNCED), ("accepted", COORD_ACCEPTED)):
            m = pattern.match(line)
            if m:
                coord[key].setdefault(int(m["round"]), []).append(_ts(m["ts"]))
    clients: dict[str, dict[int, list[float]]] = {"global": {}, "training": {}, "trained": {}, "acked": {}}
    train_secs: dict[int, list[float]] = {}
    after_training: dict[int, list[float]] = {}  # per client: 'trained in' line - (training start + train seconds)
    for log_path in sorted((out / "clients").glob("*/client.log")):
        began: dict[int, float] = {}
        for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            for key, pattern in (
                ("global", CLIENT_GLOBAL),
                ("training", CLIENT_TRAINING),
                ("trained", CLIENT_TRAINED),
                ("acked", CLIENT_ACKED),
            ):
                m = pattern.match(line)
                if m:
                    r, ts = int(m["round"]), _ts(m["ts"])
                    clients[key].setdefault(r, []).append(ts)
                    if key == "training":
                        began[r] = ts
                    elif key == "trained":
                        train_secs.setdefault(r, []).append(float(m["secs"]))
                        if r in began:
                            after_training.setdefault(r, []).append(ts - began[r] - float(m["secs"]))
    # The coordinator logs the round summary right after writing the metrics line: "round N, k/k clients, ...".
    ends: dict[int, float] = {}
    summary = re.compile(_TS + r" .*: round (?P<round>\d+), \d+/\d+ clients")
    for line in lines:
        m = summary.match(line)
        if m:
            ends[int(m["round"])] = _ts(m["ts"])
    result = {}
    for row in rows:
        r = row["round"]
        if r not in ends:
            continue
        start = ends[r] - row["round_seconds"]

        def rel(values: list[float] | None, pick, start=start) -> float | None:
            return None if not values else pick(values) - start

        result[r] = {
            "announced": rel(coord["announced"].get(r), min),
            "last_client_has_global": rel(clients["global"].get(r), max),
            "first_training_start": rel(clients["training"].get(r), min),
            "last_training_start": rel(clients["training"].get(r), max),
            "last_update_ready": rel(clients["trained"].get(r), max),
            "last_ack_at_client": rel(clients["acked"].get(r), max),
            # The coordinator logs each accepted update at debug level only: present with "-- -v".
            "last_update_accepted": rel(coord["accepted"].get(r), max),
            "round_end": row["round_seconds"],
            "client_train_seconds": sorted(train_secs.get(r, [])),
            "client_after_training_seconds": sorted(after_training.get(r, [])),
        }
    return result


# -- reporting ---------------------------------------------------------------------
def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _versions() -> dict:
    out = package_versions("numpy", "ai-edge-litert", "paho-mqtt", "amqtt", "litefed")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        mosq = shutil.which("mosquitto")
        if mosq:
            proc = subprocess.run([mosq, "-h"], capture_output=True, text=True, timeout=10)
            first = (proc.stdout or proc.stderr).splitlines()
            out["mosquitto"] = first[0].strip() if first else "present"
    return out


def print_report(res: dict) -> None:
    rows, cfg = res["rounds"], res["config"]
    print(
        f"\nRound overhead, {cfg['clients']} emulated clients, {cfg['rounds']} rounds, partition {cfg['partition']}, "
        f"round timeout {cfg['round_timeout']:g} s, lr {cfg['lr']:g}; {res['machine']['nproc']} cores"
    )
    header = (
        "round", "clients", "round s", "slowest client s", "overhead s", "aggregate s", "evaluate s",
        "other s", "MB in", "MB out", "test acc",
    )  # fmt: skip
    table = [header]
    for r in rows:
        table.append(
            (
                str(r["round"]),
                r["clients"],
                _fmt(r["round_seconds"]),
                _fmt(r["slowest_client_seconds"]),
                _fmt(r["overhead_seconds"]),
                _fmt(r["aggregate_seconds"], ".3f"),
                _fmt(r["evaluate_seconds"], ".3f"),
                _fmt(r["other_overhead_seconds"]),
                _fmt(None if r["bytes_in"] is None else r["bytes_in"] / 1e6, ".1f"),
                _fmt(None if r["bytes_out"] is None else r["bytes_out"] / 1e6, ".1f"),
                _fmt(r["test_accuracy"], ".4f"),
            )
        )
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    for j, t in enumerate(table):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    s = res["summary"]
    fraction = s["median_overhead_fraction"]
    print(
        f"  median over rounds {s['median_rounds']}: overhead {_fmt(s['median_overhead_seconds'])} s "
        f"({_fmt(None if fraction is None else 100 * fraction, '.0f')}% of the round), "
        f"round {_fmt(s['median_round_seconds'])} s, slowest client {_fmt(s['median_slowest_client_seconds'])} s, "
        f"aggregate {_fmt(s['median_aggregate_seconds'], '.3f')} s, "
        f"evaluate {_fmt(s['median_evaluate_seconds'], '.3f')} s, other {_fmt(s['median_other_overhead_seconds'])} s"
    )
    print(f"  {s['round1_note']}")
    print(
        f"  final test accuracy {_fmt(s['final_test_accuracy'], '.4f')}; emulation wall time "
        f"{res['emulation']['wall_seconds']:.1f} s; MB = 10**6 bytes counted by the coordinator "
        "(the broker's fan-out of the global model to every client is not in 'MB out')"
    )
    if res["timeline"]:
        print("\nTimeline from log timestamps (seconds after the round started; best effort, 1 ms log resolution):")
        head = (
            "round", "announced", "last client has global", "training starts first..last",
            "last update ready", "last ack at client", "round end", "client train s min/med/max",
            "client after-train s med/max",
        )  # fmt: skip
        ttable = [head]
        for r, t in sorted(res["timeline"].items(), key=lambda kv: int(kv[0])):
            secs = t["client_train_seconds"]
            spread = f"{min(secs):.1f}/{statistics.median(secs):.1f}/{max(secs):.1f}" if secs else "-"
            post = t["client_after_training_seconds"]
            post_s = f"{statistics.median(post):.2f}/{max(post):.2f}" if post else "-"
            ttable.append(
                (
                    str(r),
                    _fmt(t["announced"]),
                    _fmt(t["last_client_has_global"]),
                    f"{_fmt(t['first_training_start'])}..{_fmt(t['last_training_start'])}",
                    _fmt(t["last_update_ready"]),
                    _fmt(t["last_ack_at_client"]),
                    _fmt(t["round_end"]),
                    spread,
                    post_s,
                )
            )
        widths = [max(len(t[i]) for t in ttable) for i in range(len(head))]
        for j, t in enumerate(ttable):
            print("  " + "  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)))
            if j == 0:
                print("  " + "  ".join("-" * w for w in widths))
        print(
            "  'last update ready': the last client's 'trained in' log line, written after training, computing the "
            "delta, encoding and saving the update;\n  'last ack at client': the last client's log line for the "
            "coordinator's ack of its update;\n  'after-train': per client, its 'trained in' line's time - (training "
            "start + reported train seconds, logged to 0.1 s): delta, checks, encoding, hashing, fsync'd save"
        )
    print("  (no targets; exit status is 0 whatever the numbers)")
    print(f"\ncommand: {res['command']}")
    print(f"emulation: {res['emulation']['command']}")


def summarize(rows: list[dict]) -> dict:
    later = [r for r in rows if r["round"] > 1 and r["overhead_seconds"] is not None]
    used = later or [r for r in rows if r["overhead_seconds"] is not None]

    def med(key: str) -> float | None:
        values = [r[key] for r in used if r[key] is not None]
        return statistics.median(values) if values else None

    fractions = [r["overhead_seconds"] / r["round_seconds"] for r in used if r["round_seconds"] > 0]
    accuracies = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    if later:
        note = (
            "round 1 is left out of the medians: it also waits for the client processes to start and connect, "
            "includes every client's download of the model and first-touch effects"
        )
    else:
        note = "only round 1 completed: the medians include its start-up (client processes, model download)"
    return {
        "median_rounds": [r["round"] for r in used],
        "median_overhead_seconds": med("overhead_seconds"),
        "median_overhead_fraction": statistics.median(fractions) if fractions else None,
        "median_round_seconds": med("round_seconds"),
        "median_slowest_client_seconds": med("slowest_client_seconds"),
        "median_aggregate_seconds": med("aggregate_seconds"),
        "median_evaluate_seconds": med("evaluate_seconds"),
        "median_other_overhead_seconds": med("other_overhead_seconds"),
        "final_test_accuracy": accuracies[-1] if accuracies else None,
        "round1_note": note,
    }


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python scripts/bench_round_overhead.py",
        description=(
            "Round overhead with N emulated clients: runs python -m coordinator.cli.emulate (built-in MNIST CNN, "
            "bundled MNIST subset) and reports per round round_seconds, slowest_client_seconds, "
            "overhead = round - slowest client (split into aggregate, evaluate and the rest), bytes in/out and "
            "test accuracy, plus the median overhead over rounds 2..R. Options this script does not know are "
            "passed on to coordinator.cli.emulate (put them after --). Exits 0 when the emulation completed."
        ),
        epilog=(
            "Examples (from the repository root): python scripts/bench_round_overhead.py; "
            "python scripts/bench_round_overhead.py --rounds 6 -- --codec float16"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--clients", type=int, default=10, help="emulated client processes")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds (round 1 is left out of the medians)")
    p.add_argument("--partition", default="iid", help="data partition: iid, dirichlet:ALPHA or shards:K")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help="emulation output directory (emptied first if it holds only an earlier emulation's output)",
    )
    p.add_argument("--round-timeout", type=float, default=300.0, help="seconds clients get per round")
    p.add_argument("--lr", type=float, default=0.05, help="client learning rate")
    p.add_argument("--json", type=Path, default=Path(DEFAULT_JSON), help="where to write the JSON results")
    p.add_argument("--quiet", action="store_true", help="do not echo the emulation's output (it is in DIR/emulate.log)")
    args, passthrough = p.parse_known_args(argv)
    if passthrough[:1] == ["--"]:
        passthrough = passthrough[1:]
    for name in ("clients", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args, passthrough


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if not args.out.is_absolute():
        args.out = (Path.cwd() / args.out).resolve()
    prepare_out(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = emulate_command(args, passthrough)
    # Shown relative to the current directory when inside it (the command runs from the repository root).
    inside = args.out.is_relative_to(Path.cwd())
    shown_out = os.path.relpath(args.out) if inside else str(args.out)
    shown = "python " + " ".join(shlex.quote(shown_out if c == str(args.out) else c) for c in cmd[1:])
    print(f"== running: {shown}", flush=True)
    load_before = os.getloadavg()
    code, wall, lines = run_emulation(cmd, args.out / "emulate.log", args.quiet)
    load_after = os.getloadavg()
    metrics_path = args.out / "metrics.jsonl"
    if code != 0 or not metrics_path.exists():
        print(f"emulation failed (exit {code}); see {args.out / 'emulate.log'}", file=sys.stderr)
        return code or 1

    rows = per_round(read_metrics(metrics_path))
    try:
        tl = timeline(args.out, lines, rows)
    except (OSError, ValueError) as exc:  # the logs are a best-effort extra
        print(f"note: no timeline from the logs: {exc}", file=sys.stderr)
        tl = {}
    results = {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": load_after},
        "versions": _versions(),
        "config": {
            "clients": args.clients,
            "rounds": args.rounds,
            "partition": args.partition,
            "round_timeout": args.round_timeout,
            "lr": args.lr,
            "passthrough": passthrough,
            "out": str(args.out),
        },
        "emulation": {"command": shown, "exit_status": code, "wall_seconds": wall, "summary": lines[-8:]},
        "rounds": rows,
        "summary": summarize(rows),
        "timeline": tl,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_report(results)
    print(f"\nwrote {args.json}; emulation output in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
