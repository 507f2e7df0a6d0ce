#!/usr/bin/env python
"""Benchmark transfer learning on the edge runtime: a train step against one inference of the frozen base.

Issue 12: with the frozen base's weights as graph constants, the train step of a
frozen-base model should cost little more than one inference of the base. One
run of this script:

1. converts a frozen ``keras.applications.MobileNetV2`` feature extractor
   (``--alpha``, ``--size``, random weights: the timing does not depend on them)
   under GlobalAveragePooling2D + a trainable Dense head with litefed (batch
   ``--batch-size``, SGD), and the base alone with TensorFlow's stock TFLite
   converter (an inference-only model, the yardstick), in a ``--worker convert``
   subprocess;
2. starts one ``--worker litert`` subprocess in which TensorFlow cannot be
   imported; it loads both models with ``--threads`` threads and, after
   ``--warmup`` untimed rounds, times ``--steps`` rounds of: one ``train`` step
   of the transfer model, one ``infer`` of the transfer model, one inference
   of the base alone (the same batch, interleaved, so load changes hit all three);
3. prints median milliseconds, the ratio train / base inference and the
   worker's peak RSS, and writes them to ``--out/bench_transfer.json``.

Run from the repository root:  python scripts/bench_transfer.py
(quick check:  python scripts/bench_transfer.py --alpha 0.35 --size 32 --steps 5)
"""

# The TensorFlow import blocker must be installed before anything else is
# imported in the litert worker, so it comes first (scriptlib is stdlib-only).
import sys

from scriptlib import BLOCKED, block_tensorflow

_BLOCKER = block_tensorflow() if "--worker=litert" in sys.argv else None

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from scriptlib import machine, package_versions  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

LR = 0.01
CLASSES = 5
RESULTS_FILE = "bench_transfer.json"


def worker_convert(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    from converter import ConvertConfig, convert_model

    keras.utils.set_random_seed(0)
    shape = (args.size, args.size, 3)
    base = keras.applications.MobileNetV2(input_shape=shape, alpha=args.alpha, include_top=False, weights=None)
    base.trainable = False
    inputs = keras.Input(shape)
    features = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    model = keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax", name="head")(features))
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(LR))

    out = Path(args.out)
    t0 = time.perf_counter()
    converted = convert_model(model, ConvertConfig(batch_size=args.batch_size, verify=args.verify))
    convert_s = time.perf_counter() - t0
    converted.save(out / "transfer.tflite")

    infer = tf.function(lambda x: base(x, training=False))
    concrete = infer.get_concrete_function(tf.TensorSpec([args.batch_size, *shape], tf.float32))
    stock = tf.lite.TFLiteConverter.from_concrete_functions([concrete], infer)
    (out / "base.tflite").write_bytes(stock.convert())
    return {
        "worker": "convert",
        "convert_s": convert_s,
        "base_parameters": int(sum(v.numpy().size for v in base.weights)),
        "trainable_parameters": int(sum(math.prod(w.shape) for w in converted.manifest.weights)),
        "transfer_tflite_bytes": len(converted.tflite),
        "base_tflite_bytes": (out / "base.tflite").stat().st_size,
        "verification": converted.report.to_json() if converted.report else None,
    }


def worker_litert(args) -> dict:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from edge_client.runtime import TrainableModel

    out = Path(args.out)
    model = TrainableModel.load(out / "transfer.tflite", num_threads=args.threads)
    base = Interpreter(model_path=str(out / "base.tflite"), num_threads=args.threads)
    base.allocate_tensors()
    base_in, base_out = base.get_input_details()[0]["index"], base.get_output_details()[0]["index"]

    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (args.batch_size, args.size, args.size, 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, args.batch_size).astype(np.int32)
    sw = np.ones(args.batch_size, np.float32)

    def run_base():
        base.set_tensor(base_in, x)
        base.invoke()
        return base.get_tensor(base_out)

    timed = {"train": lambda: model.train_step(x, y, sample_weight=sw, lr=LR), "infer": lambda: model.infer_batch(x)}
    timed["base_inference"] = run_base
    times: dict[str, list[float]] = {name: [] for name in timed}
    losses = []
    for i in range(args.warmup + args.steps):
        for name, fn in timed.items():
            t0 = time.perf_counter()
            result = fn()
            dt = (time.perf_counter() - t0) * 1e3
            if name == "train":
                losses.append(float(result.loss))
            if i >= args.warmup:
                times[name].append(dt)
    assert "tensorflow" not in sys.modules, "TensorFlow was imported in the edge worker"
    loaded = sorted(m for m in sys.modules if m.split(".", 1)[0] in BLOCKED)
    assert not loaded, f"blocked modules were loaded anyway: {loaded}"
    return {
        "worker": "litert",
        "times_ms": times,
        "losses": losses,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def _run_worker(kind: str, args) -> dict:
    argv = [sys.executable, __file__, f"--worker={kind}", "--out", args.out]
    for flag in ("alpha", "size", "batch_size", "threads", "warmup", "steps"):
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if not args.verify:
        argv.append("--no-verify")
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=["convert", "litert"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="/tmp/litefed-bench-transfer")
    parser.add_argument("--alpha", type=float, default=0.35, help="MobileNetV2 width multiplier")
    parser.add_argument("--size", type=int, default=96, help="input height and width")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip parity verification")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    args = parser.parse_args(argv)
    if args.worker:
        result = worker_convert(args) if args.worker == "convert" else worker_litert(args)
        print(json.dumps(result))
        return 0

    Path(args.out).mkdir(parents=True, exist_ok=True)
    converted = _run_worker("convert", args)
    litert = _run_worker("litert", args)
    medians = {name: statistics.median(t) for name, t in litert["times_ms"].items()}
    ratio = medians["train"] / medians["base_inference"]
    results = {
        "settings": {k: getattr(args, k) for k in ("alpha", "size", "batch_size", "threads", "warmup", "steps")},
        "convert": converted,
        "litert": litert,
        "median_ms": medians,
        "train_over_base_inference": ratio,
        "machine": machine(),
        "versions": package_versions("ai-edge-litert", "tensorflow", "keras", "numpy"),
    }
    (Path(args.out) / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    print(
        f"MobileNetV2-{args.alpha} {args.size}x{args.size}, batch {args.batch_size}, {args.threads} thread(s): "
        f"{converted['base_parameters']:,} frozen / {converted['trainable_parameters']:,} trainable parameters"
    )
    for name, value in medians.items():
        print(f"  {name:<15} {value:8.2f} ms (median of {args.steps})")
    print(f"  train / base inference = {ratio:.2f}; litert worker peak RSS {litert['peak_rss_mib']:.0f} MiB")
    print(f"  loss {litert['losses'][0]:.4f} -> {litert['losses'][-1]:.4f}; results in {args.out}/{RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
