#!/usr/bin/env python
"""Benchmark FedAvg aggregation throughput on the coordinator for the MNIST CNN.

Issue 3 asks how many client updates per second the coordinator can fold in,
how far its aggregation is from the plain NumPy weighted sum, and whether
memory stays flat however many updates arrive.

The model is the MNIST CNN of ``converter.zoo:mnist_cnn`` (1,663,370 float32
parameters in 8 tensors). Its shapes are hard-coded here, so neither
TensorFlow nor a converted model is needed. ``--distinct`` random updates
(float32, normal(0, 0.01), example counts 50..1000, seed 0) are generated once
and cycled through; every variant sees exactly the same updates in the same
order. Per update, the variants do:

a. ``bound``: the minimal NumPy loop, ``acc += n * w`` per tensor into
   preallocated float64 accumulators (``n * w`` is computed in float32);
a2. ``bound64``: the same with a float64 product,
   ``acc += np.multiply(w, n, dtype=float64)``, the arithmetic
   ``StreamingAverage`` does, without its checks;
b. ``streaming``: ``StreamingAverage.add(weights, n)``, the coordinator's
   aggregation (layout check, finiteness check, float64 accumulation);
c. ``full``: what the coordinator does with one reassembled update frame:
   ``decode_frame(bytes)`` + ``validate_frame(...)`` (manifest specs, model
   hash, round) + ``FedAvg().begin_aggregation(...).add(ClientUpdate(..., validated=True))``,
   on frames encoded beforehand with ``encode_frame`` (codec float32);
c'. ``full_rechecked``: (c) with ``validated=False``, the path before issue 10,
   where the aggregation checked layout and values a second time;
d. ``chunks+full``: (c) preceded by ``Reassembler.add`` of the update's
   96 KiB MQTT chunks (``edge_client.chunks.split``, done beforehand), i.e.
   everything the coordinator does per received update except MQTT I/O.

One repeat runs every variant once, in an order rotated from repeat to
repeat, each on a fresh aggregator: one untimed warm-up update (allocates the
float64 sums and touches their pages), then ``--updates`` timed updates.
updates/s = timed updates / wall time of the batch; reported as the median
over repeats, with the ratio to the bound (a). MB/s counts float32 parameter
bytes (4 x 1,663,370 = 6.65 MB per update, MB = 10**6 bytes). The end of a
round (``finish()``: the mean plus ``apply_delta``) is timed separately.

Memory: with ``tracemalloc`` (NumPy reports its buffers to it), the peak
traced memory of a fresh ``StreamingAverage`` after 10 and after 100
``add`` calls, and the same for the full path (c); the updates themselves are
allocated before tracing starts and are not counted.

Prints a table and the exact command, writes ``--out/bench_aggregation.json``
and exits 0 whatever the numbers.

Run from the repository root:  python scripts/bench_aggregation.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
from scriptlib import machine, package_versions

from coordinator.strategies import ClientUpdate, FedAvg
from coordinator.strategies.aggregate import StreamingAverage
from edge_client.chunks import DEFAULT_MAX_CHUNK, Reassembler, split
from edge_client.frames import Frame, decode_frame, encode_frame, validate_frame
from edge_client.weights import NamedArray, TensorSpec

RESULTS_FILE = "bench_aggregation.json"
SEED = 0
MODEL_SHA256 = "ab" * 32  # any 64-hex string: frames and validate_frame only compare it
ROUND = 1

# converter.zoo:mnist_cnn, in manifest (get_weights) order.
MNIST_CNN_SHAPES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("conv2d/kernel", (5, 5, 1, 32)),
    ("conv2d/bias", (32,)),
    ("conv2d_1/kernel", (5, 5, 32, 64)),
    ("conv2d_1/bias", (64,)),
    ("dense/kernel", (3136, 512)),
    ("dense/bias", (512,)),
    ("dense_1/kernel", (512, 10)),
    ("dense_1/bias", (10,)),
)
MNIST_CNN_PARAMS = 1_663_370
SPECS = tuple(TensorSpec(name, shape, "float32") for name, shape in MNIST_CNN_SHAPES)
assert sum(int(np.prod(s)) for _, s in MNIST_CNN_SHAPES) == MNIST_CNN_PARAMS

VARIANTS = ("bound", "bound64", "streaming", "full", "full_rechecked", "chunks_full")
LABELS = {
    "bound": "a. bound: acc += n * w (float32 product)",
    "bound64": "a2. acc += multiply(w, n, dtype=float64)",
    "streaming": "b. StreamingAverage.add",
    "full": "c. decode + validate + FedAvg add",
    "full_rechecked": "c'. (c), the aggregation re-checking",
    "chunks_full": "d. chunk reassembly + (c)",
}


# -- the updates -------------------------------------------------------------------
def make_updates(count: int) -> list[tuple[list[NamedArray], int]]:
    rng = np.random.default_rng(SEED)
    updates = []
    for _ in range(count):
        weights = [
            NamedArray(name, (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)))
            for name, shape in MNIST_CNN_SHAPES
        ]
        updates.append((weights, int(rng.integers(50, 1001))))
    return updates


def encode_updates(updates, max_chunk: int) -> tuple[list[bytes], list[list[bytes]]]:
    frames, chunked = [], []
    for i, (weights, n) in enumerate(updates):
        frame = Frame(
            kind="update",
            round=ROUND,
            model_sha256=MODEL_SHA256,
            tensors=weights,
            client_id=f"client-{i:03d}",
            num_examples=n,
            metrics={"loss": 0.5, "accuracy": 0.9, "train_seconds": 10.0},
        )
        data = encode_frame(frame)
        frames.append(data)
        chunked.append(split(data, max_chunk))
    return frames, chunked


def global_weights() -> list[NamedArray]:
    return [NamedArray(name, np.zeros(shape, np.float32)) for name, shape in MNIST_CNN_SHAPES]


# -- the variants ------------------------------------------------------------------
# Each factory returns (add(i), finish()) for a fresh aggregator; add(i) folds in update i.
def make_bound(updates, frames, chunked):
    acc = [np.zeros(shape, np.float64) for _, shape in MNIST_CNN_SHAPES]
    total = [0]

    def add(i: int) -> None:
        weights, n = updates[i]
        for a, (_, w) in zip(acc, weights, strict=True):
            a += n * w
        total[0] += n

    def finish():
        return [a / total[0] for a in acc]

    return add, finish


def make_bound64(updates, frames, chunked):
    acc = [np.zeros(shape, np.float64) for _, shape in MNIST_CNN_SHAPES]
    total = [0]

    def add(i: int) -> None:
        weights, n = updates[i]
        for a, (_, w) in zip(acc, weights, strict=True):
            a += np.multiply(w, float(n), dtype=np.float64)
        total[0] += n

    def finish():
        return [a / total[0] for a in acc]

    return add, finish


def make_streaming(updates, frames, chunked):
    average = StreamingAverage()

    def add(i: int) -> None:
        weights, n = updates[i]
        average.add(weights, n)

    return add, average.result


def _full_path(aggregation, data: bytes, validated: bool = True) -> None:
    frame = decode_frame(data)
    validate_frame(frame, SPECS, MODEL_SHA256, "update", current_round=ROUND)
    update = ClientUpdate(frame.client_id, frame.tensors, frame.num_examples, dict(frame.metrics), validated=validated)
    aggregation.add(update)


def make_full(updates, frames, chunked, validated: bool = True):
    aggregation = FedAvg().begin_aggregation(ROUND, global_weights())

    def add(i: int) -> None:
        _full_path(aggregation, frames[i], validated)

    return add, aggregation.finish


def make_full_rechecked(updates, frames, chunked):
    """(c) as it was before issue 10: the aggregation checks layout and values again."""
    return make_full(updates, frames, chunked, validated=False)


def make_chunks_full(updates, frames, chunked):
    aggregation = FedAvg().begin_aggregation(ROUND, global_weights())
    reassembler = Reassembler()

    def add(i: int) -> None:
        payload = None
        for chunk in chunked[i]:
            payload = reassembler.add(chunk, source=f"litefed/default/client-{i:03d}/update")
        assert payload is not None, "the last chunk completes the transfer"
        _full_path(aggregation, payload)

    return add, aggregation.finish


FACTORIES = {
    "bound": make_bound,
    "bound64": make_bound64,
    "streaming": make_streaming,
    "full": make_full,
    "full_rechecked": make_full_rechecked,
    "chunks_full": make_chunks_full,
}


def run_once(variant: str, data, n_updates: int) -> dict:
    updates, frames, chunked = data
    add, finish = FACTORIES[variant](updates, frames, chunked)
    distinct = len(updates)
    add(distinct - 1)  # warm-up: allocates and touches the float64 sums
    gc.collect()
    times = []
    t_start = time.perf_counter()
    for k in range(n_updates):
        t0 = time.perf_counter()
        add(k % distinct)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_start
    t0 = time.perf_counter()
    finish()
    finish_s = time.perf_counter() - t0
    per_update_ms = [t * 1e3 for t in times]
    return {"updates": n_updates, "wall_s": wall, "per_update_ms": per_update_ms, "finish_ms": finish_s * 1e3}


def check_agreement(data) -> dict:
    """Max |difference| of the (b) and (c) means from the float64 bound's, over all distinct updates.

    Same arithmetic in the same order, so StreamingAverage should match exactly; the full path
    adds the mean to zero global weights with apply_delta, so it is compared in float32.
    """
    distinct = len(data[0])
    out = {}
    ref = None
    for variant in ("bound64", "streaming", "full", "full_rechecked"):
        add, finish = FACTORIES[variant](*data)
        for i in range(distinct):
            add(i)
        result = [np.asarray(getattr(t, "array", t)) for t in finish()]
        if ref is None:
            ref = [r.astype(np.float32) for r in result]
            continue
        out[f"{variant}_vs_bound64_max_abs"] = max(
            float(np.max(np.abs(r.astype(np.float32) - e))) for r, e in zip(result, ref, strict=True)
        )
    return out


# -- memory ------------------------------------------------------------------------
def traced_peak(variant: str, data, n_updates: int) -> dict:
    """tracemalloc current/peak after n_updates adds into a fresh aggregator (inputs allocated beforehand)."""
    updates, frames, chunked = data
    gc.collect()
    tracemalloc.start()
    try:
        add, _ = FACTORIES[variant](updates, frames, chunked)
        for k in range(n_updates):
            add(k % len(updates))
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"updates": n_updates, "current_bytes": current, "peak_bytes": peak}


# -- reporting ---------------------------------------------------------------------
def summarize(runs: dict[str, list[dict]]) -> dict:
    bytes_per_update = 4 * MNIST_CNN_PARAMS
    out = {}
    for variant, reps in runs.items():
        rates = [r["updates"] / r["wall_s"] for r in reps]
        per_update = [t for r in reps for t in r["per_update_ms"]]
        out[variant] = {
            "updates_per_s_median": statistics.median(rates),
            "updates_per_s_min": min(rates),
            "updates_per_s_max": max(rates),
            "updates_per_s_per_repeat": rates,
            "mb_per_s_median": statistics.median(rates) * bytes_per_update / 1e6,
            "ms_per_update_median": statistics.median(per_update),
            "finish_ms_median": statistics.median(r["finish_ms"] for r in reps),
        }
    bound = out["bound"]["updates_per_s_median"]
    bound_reps = out["bound"]["updates_per_s_per_repeat"]
    for s in out.values():
        s["ratio_to_bound"] = s["updates_per_s_median"] / bound
        # Same-repeat ratios: each repeat runs every variant back to back, so these see the same machine state.
        s["ratio_to_bound_per_repeat"] = [r / b for r, b in zip(s["updates_per_s_per_repeat"], bound_reps, strict=True)]
        s["ratio_to_bound_paired_median"] = statistics.median(s["ratio_to_bound_per_repeat"])
    return out


def print_table(res: dict) -> None:
    cfg, summ = res["config"], res["summary"]
    print(
        f"\nAggregation throughput, MNIST CNN ({MNIST_CNN_PARAMS:,} float32 params, "
        f"{4 * MNIST_CNN_PARAMS / 1e6:.2f} MB per update), {cfg['distinct']} distinct updates cycled, "
        f"{cfg['updates']} timed updates x {cfg['repeats']} interleaved repeats"
    )
    rows = [("variant", "updates/s", "(min-max)", "ms/update", "MB/s", "x bound", "paired x bound", "finish ms")]
    for v in VARIANTS:
        s = summ[v]
        rows.append(
            (
                LABELS[v],
                f"{s['updates_per_s_median']:.1f}",
                f"({s['updates_per_s_min']:.1f}-{s['updates_per_s_max']:.1f})",
                f"{s['ms_per_update_median']:.2f}",
                f"{s['mb_per_s_median']:.0f}",
                f"{s['ratio_to_bound']:.3f}",
                f"{s['ratio_to_bound_paired_median']:.3f}",
                f"{s['finish_ms_median']:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("  " + "  ".join(cells))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    print(
        "  updates/s and MB/s: median over repeats of (timed updates / batch wall time); ms/update: median "
        "single-update time; x bound: ratio of medians; paired: median of same-repeat ratios; "
        "finish: result() + apply_delta once per round (bound: sums / total)"
    )
    print("\nMemory (tracemalloc, fresh aggregator; the inputs are allocated before tracing and not counted):")
    for v, mem in res["memory"].items():
        parts = [
            f"after {m['updates']:>3} adds: peak {m['peak_bytes'] / 2**20:7.1f} MiB, "
            f"still held {m['current_bytes'] / 2**20:6.1f} MiB"
            for m in mem
        ]
        print(f"  {LABELS[v]:<34}  " + " | ".join(parts))
    print(
        f"  (float64 sums of the model: {8 * MNIST_CNN_PARAMS / 2**20:.1f} MiB; (c) also holds the float32 global "
        f"weights given to begin_aggregation, {4 * MNIST_CNN_PARAMS / 2**20:.1f} MiB)"
    )
    print(f"  results agree: {res['check']}")
    print("  (no targets; exit status is 0 whatever the numbers)")
    print(f"\ncommand: {res['command']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python scripts/bench_aggregation.py",
        description=(
            "Aggregation throughput of the coordinator for the MNIST CNN (1,663,370 float32 params): "
            "updates/s of (a) the plain NumPy weighted sum acc += n * w (the bound), (b) "
            "StreamingAverage.add, (c) decode_frame + validate_frame + FedAvg aggregation add on encoded "
            "frames, (d) chunk reassembly + (c); interleaved repeats on the same pre-generated updates. "
            "Also tracemalloc peaks after 10 vs 100 adds. No TensorFlow needed. Always exits 0."
        ),
        epilog="Example (from the repository root): python scripts/bench_aggregation.py --repeats 9",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--distinct", type=int, default=20, help="distinct random updates, generated once and cycled")
    p.add_argument("--updates", type=int, default=40, help="timed updates per variant per repeat")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats (every variant once per repeat)")
    p.add_argument(
        "--memory-counts",
        type=int,
        nargs="+",
        default=[10, 100],
        help="numbers of adds after which the tracemalloc peak is reported",
    )
    p.add_argument("--max-chunk", type=int, default=DEFAULT_MAX_CHUNK, help="chunk size for variant (d), bytes")
    p.add_argument("--out", default="build/bench", help="directory for the JSON results")
    args = p.parse_args(argv)
    for name in ("distinct", "updates", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if any(c < 1 for c in args.memory_counts):
        p.error("--memory-counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"== generating {args.distinct} updates of {MNIST_CNN_PARAMS:,} params and encoding them", flush=True)
    updates = make_updates(args.distinct)
    frames, chunked = encode_updates(updates, args.max_chunk)
    data = (updates, frames, chunked)
    print(
        f"   frame {len(frames[0]):,} bytes, {len(chunked[0])} chunks of at most {args.max_chunk:,} bytes",
        flush=True,
    )

    check = check_agreement(data)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rep in range(args.repeats):
        order = VARIANTS[rep % len(VARIANTS) :] + VARIANTS[: rep % len(VARIANTS)]
        line = []
        for variant in order:
            r = run_once(variant, data, args.updates)
            runs[variant].append(r)
            line.append(f"{variant} {r['updates'] / r['wall_s']:.1f}/s")
        print(f"   repeat {rep + 1}/{args.repeats}: " + ", ".join(line), flush=True)

    memory = {}
    for variant in ("streaming", "full"):
        memory[variant] = [traced_peak(variant, data, n) for n in args.memory_counts]

    results = {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": package_versions("numpy", "litefed"),
        "config": {
            "model": "converter.zoo:mnist_cnn (shapes hard-coded)",
            "params": MNIST_CNN_PARAMS,
            "tensors": [{"name": n, "shape": list(s)} for n, s in MNIST_CNN_SHAPES],
            "distinct": args.distinct,
            "updates": args.updates,
            "repeats": args.repeats,
            "max_chunk": args.max_chunk,
            "frame_bytes": len(frames[0]),
            "chunks_per_update": len(chunked[0]),
            "seed": SEED,
            "labels": LABELS,
        },
        "summary": summarize(runs),
        "memory": memory,
        "check": check,
        "runs": runs,
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {out / RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
