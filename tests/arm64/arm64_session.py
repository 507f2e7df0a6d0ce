"""One edge-client session, run by tests/arm64 on aarch64 (under qemu) and on the host.

    python3 arm64_session.py WORKDIR EXPECTED_MACHINE

WORKDIR holds model.tflite (+ model.json), data.npz (x, y, the start weights
w0, w1, ...) and the legacy models; the session writes WORKDIR/result-MACHINE.json
and WORKDIR/weights-MACHINE.npz. It uses only numpy and edge_client, as a board does.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

STEPS = 8
LR = 0.01


def main(work: Path, machine: str) -> None:
    assert platform.machine() == machine, f"running on {platform.machine()}, expected {machine}"
    from edge_client.errors import ManifestError
    from edge_client.runtime import TrainableModel
    from edge_client.training import train_local
    from edge_client.weights import NamedArray

    assert "tensorflow" not in sys.modules, "the edge client imported TensorFlow"
    with np.load(work / "data.npz") as data:
        x, y = data["x"], data["y"]
        names = json.loads(str(data["names"]))
        start = [NamedArray(n, data[f"w{i}"]) for i, n in enumerate(names)]

    model = TrainableModel.load(work / "model.tflite")
    b = model.batch_size
    model.set_weights(start)
    before = model.evaluate(x, y)
    losses = []
    for step in range(STEPS):
        sl = slice((step * b) % len(x), (step * b) % len(x) + b)
        losses.append(model.train_step(x[sl], y[sl], lr=LR).loss)
    after = model.evaluate(x, y)
    weights = model.get_weights(include_optimizer=True)
    np.savez(work / f"weights-{machine}.npz", **{n: a for n, a in weights})

    local = train_local(model, start, x, y, epochs=1, lr=LR, mu=0.01)
    result = {
        "machine": platform.machine(),
        "tensorflow_importable": _importable("tensorflow"),
        "losses": losses,
        "before": [before.loss, before.accuracy],
        "after": [after.loss, after.accuracy],
        "train_local": {"loss": local.metrics["loss"], "num_examples": local.num_examples, "epochs": local.epochs},
        "plain_runner_loss": _plain_signature_runner(work / "model.tflite", x[:b], y[:b]),
        "signing": _signing_check(),
        "legacy": {},
    }
    for path in sorted(work.glob("legacy*.tflite")):
        try:
            TrainableModel.load(path)
            result["legacy"][path.name] = "loaded"
        except ManifestError as exc:
            result["legacy"][path.name] = str(exc)
    (work / f"result-{machine}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")


def _plain_signature_runner(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """LiteRT's own SignatureRunner (which resizes every input) on the converted train signature."""
    from ai_edge_litert.interpreter import Interpreter

    train = Interpreter(model_path=str(model_path)).get_signature_runner("train")
    one = np.ones(len(x), np.float32)
    out = train(x=x, y=y, sample_weight=one, lr=np.array([LR], np.float32), mu=np.zeros(1, np.float32))
    return float(out["loss"])


def _signing_check() -> dict:
    """Seal and open an envelope with ``cryptography``'s Ed25519, as a board verifies the coordinator."""
    from edge_client.errors import ProtocolError
    from edge_client.signing import SigningKey

    key, body = SigningKey.generate(), bytes(range(256)) * 64
    envelope = key.seal("global", body)
    tampered = bytearray(envelope)
    tampered[-1] ^= 1
    try:
        key.trust_key.open("global", bytes(tampered))
        refused = ""
    except ProtocolError as exc:
        refused = exc.reason
    return {"opens": key.trust_key.open("global", envelope).body == body, "tampered": refused}


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # the host run blocks the TensorFlow family
        return False


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
