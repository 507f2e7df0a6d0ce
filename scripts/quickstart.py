#!/usr/bin/env python3
"""Convert the built-in MNIST CNN, then train it the way a board would.

Step 1 (server side, TensorFlow): ``converter.zoo:mnist_cnn`` -> build/mnist_cnn.tflite.
Step 2 (device side): a separate process in which TensorFlow cannot be
imported loads the model with ai-edge-litert only, trains it on the bundled
MNIST subset and evaluates it after every epoch.

Federated emulation over MQTT (issue 3) will replace step 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from scriptlib import block_tensorflow

ROOT = Path(__file__).resolve().parents[1]


def edge_worker(model: str, epochs: int, lr: float) -> None:
    block_tensorflow()
    import numpy as np

    from coordinator.datasets import load_bundled_mnist, to_model_input
    from edge_client.runtime import TrainableModel

    data = load_bundled_mnist()
    x, y = to_model_input(data.x_train), data.y_train.astype(np.int32)
    x_test, y_test = to_model_input(data.x_test), data.y_test.astype(np.int32)
    runtime = TrainableModel.load(model)
    rng = np.random.default_rng(0)
    print(f"[edge] TensorFlow importable: no; training on {len(x)} images, testing on {len(x_test)}", flush=True)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        train = runtime.fit(x, y, epochs=1, lr=lr, rng=rng)
        test = runtime.evaluate(x_test, y_test)
        print(
            f"[edge] epoch {epoch}/{epochs}: train loss {train.loss:.4f} acc {train.accuracy:.3f} | "
            f"test loss {test.loss:.4f} acc {test.accuracy:.3f} | {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    assert "tensorflow" not in sys.modules
    print(json.dumps({"test_accuracy": test.accuracy, "test_loss": test.loss}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "build" / "mnist_cnn.tflite"), help="where to write the model")
    parser.add_argument("--epochs", type=int, default=3, help="local epochs on the bundled subset (default 3)")
    parser.add_argument("--lr", type=float, default=0.03, help="SGD learning rate (default 0.03)")
    parser.add_argument("--edge-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.edge_worker:
        edge_worker(args.model, args.epochs, args.lr)
        return 0
    print("[server] converting converter.zoo:mnist_cnn with batch size 32", flush=True)
    from converter.cli import main as convert_main

    if convert_main(["converter.zoo:mnist_cnn", "-o", args.model, "--batch-size", "32"]) != 0:
        return 1
    cmd = [
        sys.executable,
        __file__,
        "--edge-worker",
        "--model",
        args.model,
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
    ]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
