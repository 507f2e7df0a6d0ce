"""The edge client trains a converted model on a board with no TensorFlow.

Each test runs a child Python whose first act is to install an import hook
that makes ``tensorflow``, ``keras`` and ``tf_keras`` (and their submodules)
raise ImportError, exactly as on a device where they are not installed.
"""

from __future__ import annotations

import importlib.util
import textwrap

from tests.helpers import json_output

TRAIN_WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import json
    import sys

    import numpy as np

    import edge_client
    import edge_client.errors
    import edge_client.manifest
    import edge_client.model_file
    import edge_client.runtime
    import edge_client.weights
    from edge_client.model_file import require_builtin_only
    from edge_client.runtime import TrainableModel

    model = TrainableModel.load(sys.argv[1])
    require_builtin_only(open(sys.argv[1], "rb").read())
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    x = rng.normal(size=(800, 8)).astype(np.float32)
    keep = np.abs(x @ direction) > 0.3
    x = x[keep][:200]
    y = (x @ direction > 0).astype(np.float32)[:, None]

    before = model.evaluate(x, y)
    epochs = [model.fit(x, y, epochs=1, rng=rng).loss for _ in range(4)]
    after = model.evaluate(x, y)
    weights = model.get_weights(include_optimizer=True)
    model.set_weights(weights)

    blocked = ("tensorflow", "keras", "tf_keras")
    print(json.dumps({
        "loss_before": before.loss,
        "loss_after": after.loss,
        "accuracy_after": after.accuracy,
        "epoch_losses": epochs,
        "num_weights": len(weights),
        "tf_modules": sorted(m for m in sys.modules if m.split(".")[0] in blocked),
        "import_attempts": _BlockTensorFlow.attempts,
        "edge_modules": sorted(m for m in sys.modules if m.startswith("edge_client")),
        "converter_imported": "converter" in sys.modules,
    }))
    """
)


def test_edge_client_trains_without_tensorflow(tabular, run_without_tensorflow):
    proc = run_without_tensorflow(TRAIN_WITHOUT_TENSORFLOW, str(tabular.model_path))
    result = json_output(proc)
    assert result["tf_modules"] == []
    assert result["import_attempts"] == [], "the edge client tried to import TensorFlow (even if it coped)"
    assert not result["converter_imported"]
    assert {
        "edge_client.runtime",
        "edge_client.manifest",
        "edge_client.model_file",
        "edge_client.weights",
    } <= set(result["edge_modules"])
    assert result["loss_after"] < 0.7 * result["loss_before"], result
    assert result["epoch_losses"][-1] < result["epoch_losses"][0], result
    assert result["accuracy_after"] > 0.85, result
    assert result["num_weights"] == len(tabular.manifest.all_weights)


PROBE_BLOCKER = textwrap.dedent(
    """
    import importlib
    import json

    outcome = {}
    for name in ("tensorflow", "keras", "tf_keras", "tensorflow.lite", "keras.layers"):
        try:
            importlib.import_module(name)
            outcome[name] = "imported"
        except ImportError as exc:
            outcome[name] = "blocked" if "blocked" in str(exc) else f"other ImportError: {exc}"
    try:
        from converter import convert  # the converter needs TensorFlow, so it must fail too
        outcome["converter"] = "imported"
    except ImportError as exc:
        outcome["converter"] = "blocked" if "blocked" in str(exc) else f"other ImportError: {exc}"
    import numpy  # everything else still imports
    print(json.dumps(outcome))
    """
)


def test_the_blocker_really_blocks_tensorflow(run_without_tensorflow):
    # TensorFlow is installed here, so an ImportError in the child is the blocker's doing.
    assert importlib.util.find_spec("tensorflow") is not None
    assert importlib.util.find_spec("keras") is not None
    outcome = json_output(run_without_tensorflow(PROBE_BLOCKER))
    assert outcome == {
        "tensorflow": "blocked",
        "keras": "blocked",
        "tf_keras": "blocked",
        "tensorflow.lite": "blocked",
        "keras.layers": "blocked",
        "converter": "blocked",
    }
