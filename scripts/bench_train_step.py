#!/usr/bin/env python
"""Benchmark one training step: LiteRT ``train`` signature vs Keras ``train_on_batch``.

Issue 2 asks whether training the converted MNIST CNN on the edge runtime
(numpy + ai-edge-litert, no TensorFlow) is at least as fast as training the
same model with TensorFlow/Keras, and how much memory the edge process needs.

One run of this script (the *parent*):

1. converts ``converter.zoo:mnist_cnn`` (batch size 32) into ``--out``, in a
   ``--worker convert`` subprocess so that the parent stays small (a child's
   ``ru_maxrss`` starts from its parent's peak on Linux); the Keras model is
   saved beside it (``mnist_cnn.keras``) so both sides start from the same
   weights;
2. (same subprocess) writes ``warmup + steps`` real MNIST batches (x / 255,
   shape [B, 28, 28, 1], int32 labels) to ``--out/bench_batches.npz``;
3. starts fresh worker subprocesses, interleaved ``litert, keras, litert,
   keras, ...`` (``--repeats`` pairs), each running ``--warmup`` untimed and
   ``--steps`` timed steps on those batches with ``--threads`` threads, and
   reporting its step times and peak RSS as one JSON line;
4. prints a table (median ms per step, ratio litert / keras, peak RSS of each
   kind of process, PASS/FAIL against the targets) and writes it all to
   ``--out/bench_train_step.json``. The exit status is 0 whatever the numbers.

The ``litert`` worker blocks ``tensorflow``, ``keras`` and ``tf_keras``
imports (a ``sys.meta_path`` finder installed before anything else is
imported) and checks at the end that TensorFlow was never loaded, so its
peak RSS is that of a real edge process.

Run from the repository root:  python scripts/bench_train_step.py
"""

# ---------------------------------------------------------------------------
# The TensorFlow import blocker must be installed before anything else is
# imported in a litert worker, so it comes first (scriptlib is stdlib-only).
import sys

from scriptlib import BLOCKED, block_tensorflow


def _is_litert_worker(argv: list[str]) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--worker" and i + 1 < len(argv) and argv[i + 1] == "litert":
            return True
        if arg == "--worker=litert":
            return True
    return False


_BLOCKER = block_tensorflow() if _is_litert_worker(sys.argv) else None
# ---------------------------------------------------------------------------

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from scriptlib import machine, package_versions

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MODEL_NAME = "mnist_cnn"
BATCHES_FILE = "bench_batches.npz"
RESULTS_FILE = "bench_train_step.json"
RATIO_TARGET = 1.0  # median litert step / median keras step must be <= this
EDGE_RSS_TARGET_MB = 150.0  # peak RSS of the edge process must be < this (MiB)
DEFAULT_MNIST = "../shared/data/mnist.npz"
LR = 0.02  # the learning rate mnist_cnn is compiled with (SGD(0.02))
SEED = 0


# -- memory ------------------------------------------------------------------
def _peak_rss() -> dict:
    """Peak resident set size of this process: ru_maxrss and VmHWM, in KiB."""
    ru_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    status = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                status[key] = int(value.split()[0])  # "12345 kB"
    except OSError:  # not Linux
        pass
    return {
        "ru_maxrss_kib": ru_maxrss_kib,
        "vmhwm_kib": status.get("VmHWM"),
        "vmrss_kib": status.get("VmRSS"),
    }


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024.0


# -- workers -----------------------------------------------------------------
def _load_batches(out: Path, batch_size: int, count: int):
    import numpy as np

    with np.load(out / BATCHES_FILE) as data:
        x, y = data["x"], data["y"]
    if x.shape[0] < count or x.shape[1] != batch_size:
        raise SystemExit(f"{out / BATCHES_FILE} holds {x.shape[:2]} batches, need {count} of {batch_size}")
    return x[:count], y[:count]


def _timed_loop(step, x, y, warmup: int) -> dict:
    """Run ``step(x[i], y[i])`` for every batch.

    Returns the wall time of each timed step (ms), every loss, and the CPU time
    (all threads of this process) per timed step, so that cpu / wall shows how
    many cores a side really kept busy.
    """
    times_ms, losses = [], []
    cpu0 = None
    for i in range(len(x)):
        if i == warmup:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        loss = step(x[i], y[i])
        dt = (time.perf_counter() - t0) * 1e3
        losses.append(float(loss))
        if i >= warmup:
            times_ms.append(dt)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / len(times_ms)
    return {"times_ms": times_ms, "losses": losses, "cpu_ms_per_step": cpu_ms}


def worker_litert(args) -> dict:
    import numpy as np

    from edge_client.runtime import TrainableModel

    out = Path(args.out)
    x, y = _load_batches(out, args.batch_size, args.warmup + args.steps)
    t0 = time.perf_counter()
    model = TrainableModel.load(out / f"{MODEL_NAME}.tflite", num_threads=args.threads)
    load_s = time.perf_counter() - t0
    sw = np.ones(args.batch_size, np.float32)

    def step(xb, yb):
        return model.train_step(xb, yb, sample_weight=sw, lr=LR).loss

    timing = _timed_loop(step, x, y, args.warmup)
    loaded_tf = sorted(m for m in sys.modules if m.split(".", 1)[0] in BLOCKED)
    assert "tensorflow" not in sys.modules, "TensorFlow was imported in the edge worker"
    assert not loaded_tf, f"blocked modules were loaded anyway: {loaded_tf}"
    return {
        "worker": "litert",
        "threads": args.threads,
        "load_s": load_s,
        **timing,
        "blocked_import_attempts": sorted(set(_BLOCKER.attempts)) if _BLOCKER else [],
        "tensorflow_in_sys_modules": "tensorflow" in sys.modules,
        "rss": _peak_rss(),
    }


def worker_keras(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    # Before TensorFlow does any work (no op, no tensor, no model yet).
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras

    out = Path(args.out)
    x, y = _load_batches(out, args.batch_size, args.warmup + args.steps)
    t0 = time.perf_counter()
    model = keras.saving.load_model(out / f"{MODEL_NAME}.keras")  # compiled: SGD(0.02), sparse CE
    if args.keras_jit_compile != "auto":
        model.compile(
            loss=model.loss,
            optimizer=model.optimizer,
            jit_compile=args.keras_jit_compile == "true",
        )
    load_s = time.perf_counter() - t0

    def step(xb, yb):
        return model.train_on_batch(xb, yb)

    timing = _timed_loop(step, x, y, args.warmup)
    return {
        "worker": "keras",
        "threads": args.threads,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "jit_compile": bool(model.jit_compile),
        "load_s": load_s,
        **timing,
        "rss": _peak_rss(),
    }


# -- parent --------------------------------------------------------------------
def _prepare_batches(args, out: Path) -> str:
    """Write warmup + steps batches of real MNIST (or random data) to OUT/bench_batches.npz."""
    import numpy as np

    n_batches, bs = args.warmup + args.steps, args.batch_size
    rng = np.random.default_rng(SEED)
    mnist = Path(args.mnist)
    if not mnist.is_file() and not mnist.is_absolute() and (REPO_ROOT / mnist).is_file():
        mnist = REPO_ROOT / mnist  # the default is relative to the repository root
    if mnist.is_file():
        with np.load(mnist) as data:
            x_train, y_train = data["x_train"], data["y_train"]
        need = n_batches * bs
        if need > len(x_train):
            raise SystemExit(f"--warmup + --steps need {need} examples, MNIST has {len(x_train)}")
        idx = rng.permutation(len(x_train))[:need]
        x = (x_train[idx].astype(np.float32) / 255.0).reshape(n_batches, bs, 28, 28, 1)
        y = y_train[idx].astype(np.int32).reshape(n_batches, bs)
        source = f"MNIST {mnist} (x_train, {need} examples shuffled with seed {SEED}, /255)"
    else:
        print(f"NOTE: {mnist} not found; benchmarking on RANDOM data instead of MNIST", file=sys.stderr, flush=True)
        x = rng.random((n_batches, bs, 28, 28, 1), dtype=np.float32)
        y = rng.integers(0, 10, (n_batches, bs), dtype=np.int32)
        source = f"random data (seed {SEED}); {mnist} not found"
    np.savez(out / BATCHES_FILE, x=x, y=y)
    return source


def worker_convert(args) -> dict:
    """Convert mnist_cnn once into OUT, save it as OUT/mnist_cnn.keras, write the batches."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from converter import ConvertConfig, convert
    from converter.zoo import mnist_cnn

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = mnist_cnn()
    # Saved before conversion so that the Keras worker starts from the very
    # weights the .tflite was built with.
    model.save(out / f"{MODEL_NAME}.keras")
    t0 = time.perf_counter()
    # Log to stderr: stdout carries this worker's JSON result line.
    convert(
        model,
        out / f"{MODEL_NAME}.tflite",
        ConvertConfig(batch_size=args.batch_size),
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    return {
        "worker": "convert",
        "params": int(model.count_params()),
        "convert_s": time.perf_counter() - t0,
        "tflite_bytes": (out / f"{MODEL_NAME}.tflite").stat().st_size,
        "data": _prepare_batches(args, out),
    }


def _worker_cmd(args, kind: str) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker", kind,
        "--batch-size", str(args.batch_size),
        "--threads", str(args.threads),
        "--warmup", str(args.warmup),
        "--steps", str(args.steps),
        "--out", str(args.out),
        "--mnist", str(args.mnist),
        "--keras-jit-compile", args.keras_jit_compile,
    ]  # fmt: skip


def _run_worker(args, kind: str, show_stderr: bool = False) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["OMP_NUM_THREADS"] = str(args.threads)  # in case any library uses OpenMP
    proc = subprocess.run(_worker_cmd(args, kind), cwd=os.getcwd(), env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if show_stderr or proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr if show_stderr else proc.stderr[-4000:])
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{kind} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _summarize(runs: list[dict]) -> dict:
    times = [t for r in runs for t in r["times_ms"]]
    rss_ru = max(r["rss"]["ru_maxrss_kib"] for r in runs)
    hwm = [r["rss"]["vmhwm_kib"] for r in runs if r["rss"]["vmhwm_kib"] is not None]
    return {
        "median_ms": statistics.median(times),
        "p10_ms": _pct(times, 0.10),
        "p90_ms": _pct(times, 0.90),
        "per_repeat_median_ms": [statistics.median(r["times_ms"]) for r in runs],
        "cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in runs),
        "cpu_over_wall": statistics.median(r["cpu_ms_per_step"] / statistics.mean(r["times_ms"]) for r in runs),
        "peak_ru_maxrss_kib": rss_ru,
        "peak_vmhwm_kib": max(hwm) if hwm else None,
        "peak_rss_mib": _mib(rss_ru),
        "peak_vmhwm_mib": _mib(max(hwm)) if hwm else None,
        "first_loss": runs[0]["losses"][0],
        "last_loss": runs[0]["losses"][-1],
    }


def run_parent(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])

    # The parent imports neither TensorFlow nor numpy and converts in a child
    # process: Linux carries the parent's RSS high-water mark into a child
    # started with vfork/fork + exec (ru_maxrss would report the parent's
    # peak), so the parent must stay small for the workers' ru_maxrss to mean
    # anything.
    print(f"== converting {MODEL_NAME} (batch size {args.batch_size}) into {out}", flush=True)
    conversion = _run_worker(args, "convert", show_stderr=True)
    data_source = conversion["data"]
    print(f"== data: {data_source}", flush=True)
    parent_rss_before = _peak_rss()

    runs: dict[str, list[dict]] = {"litert": [], "keras": []}
    for rep in range(args.repeats):
        for kind in ("litert", "keras"):
            result = _run_worker(args, kind)
            runs[kind].append(result)
            print(
                f"   repeat {rep + 1}/{args.repeats} {kind:6s}: median "
                f"{statistics.median(result['times_ms']):8.2f} ms/step, "
                f"peak RSS {_mib(result['rss']['ru_maxrss_kib']):7.1f} MiB",
                flush=True,
            )

    lit, ker = _summarize(runs["litert"]), _summarize(runs["keras"])
    ratio = lit["median_ms"] / ker["median_ms"]
    paired = [a / b for a, b in zip(lit["per_repeat_median_ms"], ker["per_repeat_median_ms"], strict=True)]
    loss_diff = max(abs(a - b) for a, b in zip(runs["litert"][0]["losses"], runs["keras"][0]["losses"], strict=True))
    edge_rss_mib = max(lit["peak_rss_mib"], lit["peak_vmhwm_mib"] or 0.0)
    results = {
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "versions": package_versions("numpy", "ai-edge-litert", "tensorflow-cpu", "tensorflow", "keras"),
        "config": {
            "model": f"converter.zoo:{MODEL_NAME}",
            "params": conversion["params"],
            "batch_size": args.batch_size,
            "threads": args.threads,
            "warmup": args.warmup,
            "steps": args.steps,
            "repeats": args.repeats,
            "lr": LR,
            "keras_jit_compile": runs["keras"][0]["jit_compile"],
            "data": data_source,
        },
        "conversion": conversion,
        "litert": lit,
        "keras": ker,
        "ratio_litert_over_keras": ratio,
        "per_repeat_ratio": paired,
        "max_abs_loss_diff_first_repeat": loss_diff,
        "targets": {
            "ratio": {"target": f"<= {RATIO_TARGET}", "value": ratio, "pass": ratio <= RATIO_TARGET},
            "edge_rss_mib": {
                "target": f"< {EDGE_RSS_TARGET_MB}",
                "value": edge_rss_mib,
                "pass": edge_rss_mib < EDGE_RSS_TARGET_MB,
            },
        },
        "parent_rss_before_workers": parent_rss_before,
        "litert_blocked_import_attempts": sorted({m for r in runs["litert"] for m in r["blocked_import_attempts"]}),
        "runs": runs,
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    _print_table(results)
    print(f"\nwrote {out / RESULTS_FILE}")
    return results


def _print_table(res: dict) -> None:
    lit, ker, cfg, tg = res["litert"], res["keras"], res["config"], res["targets"]

    def pf(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    def spread(side: dict) -> str:
        return f"(p10 {side['p10_ms']:.2f}, p90 {side['p90_ms']:.2f})"

    ratio = res["ratio_litert_over_keras"]
    rss_note = f"VmHWM {lit['peak_vmhwm_mib']:.1f} MiB; target < {EDGE_RSS_TARGET_MB:g}"
    rows = [
        ("LiteRT train step, median", f"{lit['median_ms']:.2f} ms", spread(lit), ""),
        ("Keras train_on_batch, median", f"{ker['median_ms']:.2f} ms", spread(ker), ""),
        ("ratio LiteRT / Keras", f"{ratio:.3f}", f"target <= {RATIO_TARGET}", pf(tg["ratio"]["pass"])),
        ("edge (LiteRT) peak RSS", f"{lit['peak_rss_mib']:.1f} MiB", rss_note, pf(tg["edge_rss_mib"]["pass"])),
        ("TF/Keras peak RSS", f"{ker['peak_rss_mib']:.1f} MiB", f"VmHWM {ker['peak_vmhwm_mib']:.1f} MiB", ""),
    ]
    w0, w1, w2 = (max(len(r[i]) for r in rows) for i in range(3))
    print(
        f"\nTrain step, {cfg['model']} ({cfg['params']:,} params), batch {cfg['batch_size']}, "
        f"{cfg['threads']} thread(s), {cfg['warmup']} warmup + {cfg['steps']} timed steps x "
        f"{cfg['repeats']} interleaved repeats; Keras jit_compile={cfg['keras_jit_compile']}"
    )
    print(f"data: {cfg['data']}")
    for r in rows:
        print(f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:<{w2}}  {r[3]}")
    print(
        f"  CPU time per step (all threads): LiteRT {lit['cpu_ms_per_step']:.1f} ms "
        f"(cpu/wall {lit['cpu_over_wall']:.2f}), Keras {ker['cpu_ms_per_step']:.1f} ms "
        f"(cpu/wall {ker['cpu_over_wall']:.2f})"
    )
    print("  per-repeat ratio: " + ", ".join(f"{p:.3f}" for p in res["per_repeat_ratio"]))
    print(
        f"  same start weights and batches: max |loss_litert - loss_keras| over "
        f"{len(res['runs']['litert'][0]['losses'])} steps = {res['max_abs_loss_diff_first_repeat']:.2e}"
    )
    if res["litert_blocked_import_attempts"]:
        print(f"  (edge worker: blocked import attempts {res['litert_blocked_import_attempts']})")
    print("  (targets are informational; exit status is 0 either way)")
    print(f"\ncommand: {res['command']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python scripts/bench_train_step.py",
        description=(
            "Benchmark one SGD training step of the converted MNIST CNN: LiteRT "
            "(TrainableModel.train_step, numpy + ai-edge-litert only) vs TensorFlow/Keras "
            "(model.train_on_batch), same batches, same thread count, each side in fresh "
            "interleaved subprocesses. Reports median step time, the ratio litert/keras "
            "(target <= 1.0) and peak RSS (edge target < 150 MiB). Always exits 0."
        ),
        epilog="Example (from the repository root): python scripts/bench_train_step.py --repeats 5",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch-size", type=int, default=32, help="batch size the model is converted with and trained on")
    p.add_argument("--threads", type=int, default=2, help="LiteRT num_threads and TF intra-op threads (inter-op is 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per worker before timing")
    p.add_argument("--steps", type=int, default=50, help="timed steps per worker")
    p.add_argument("--repeats", type=int, default=3, help="interleaved (litert, keras) worker pairs")
    p.add_argument("--out", default="build/bench", help="directory for the model, the batches and the JSON results")
    p.add_argument(
        "--mnist",
        default=DEFAULT_MNIST,
        help="MNIST in Keras mnist.npz format (relative to the current directory or the repository root); "
        "random data, with a printed note, if missing",
    )
    p.add_argument(
        "--keras-jit-compile",
        choices=("auto", "true", "false"),
        default="auto",
        help="Keras side: keep the compile setting of converter.zoo (auto; no XLA here) or force XLA on/off",
    )
    p.add_argument(
        "--worker",
        choices=("convert", "litert", "keras"),
        help="internal: run one worker (conversion or measurement) and print its results as one JSON line",
    )
    args = p.parse_args(argv)
    for name in ("batch_size", "threads", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker == "litert":
        print(json.dumps(worker_litert(args)), flush=True)
    elif args.worker == "keras":
        print(json.dumps(worker_keras(args)), flush=True)
    elif args.worker == "convert":
        print(json.dumps(worker_convert(args)), flush=True)
    else:
        run_parent(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
