"""The contract between a converted ``.tflite`` and its manifest.

What the interpreter itself reports (signature names, input and output names,
shapes and dtypes) must match what the manifest promises devices.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from edge_client.manifest import Manifest, load_manifest
from edge_client.model_file import summarize_operators

SIGNATURES = {"train", "infer", "evaluate", "get_weights", "set_weights"}
MNIST_SHAPES = [
    (5, 5, 1, 32),
    (32,),
    (5, 5, 32, 64),
    (64,),
    (7 * 7 * 64, 512),
    (512,),
    (512, 10),
    (10,),
]


def details(runner_details: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {name: (tuple(int(d) for d in d_["shape"]), np.dtype(d_["dtype"])) for name, d_ in runner_details.items()}


def io(interpreter: Interpreter, signature: str):
    runner = interpreter.get_signature_runner(signature)
    return details(runner.get_input_details()), details(runner.get_output_details())


@pytest.fixture(scope="module")
def mnist_interpreter(mnist_cnn) -> Interpreter:
    return Interpreter(model_content=mnist_cnn.tflite)


F32, I32 = np.dtype(np.float32), np.dtype(np.int32)


def test_signature_names_are_exactly_the_five(mnist_cnn, mnist_interpreter):
    assert set(mnist_interpreter.get_signature_list()) == SIGNATURES
    assert set(mnist_cnn.manifest.signatures) == SIGNATURES


def test_mnist_train_signature(mnist_cnn, mnist_interpreter):
    inputs, outputs = io(mnist_interpreter, "train")
    assert inputs == {
        "x": ((32, 28, 28, 1), F32),
        "y": ((32,), I32),
        "sample_weight": ((32,), F32),
        "lr": ((1,), F32),
        "mu": ((1,), F32),
    }
    assert outputs == {"loss": ((), F32), "correct": ((), F32)}
    assert mnist_cnn.manifest.signatures["train"] == {
        "inputs": ["x", "y", "sample_weight", "lr", "mu"],
        "outputs": ["loss", "correct"],
    }


def test_mnist_infer_and_evaluate_signatures(mnist_cnn, mnist_interpreter):
    manifest = mnist_cnn.manifest
    inputs, outputs = io(mnist_interpreter, "infer")
    assert inputs == {"x": ((32, 28, 28, 1), F32)}
    assert outputs == {"output": ((32, 10), F32)}
    assert manifest.output.shape == (32, 10)

    inputs, outputs = io(mnist_interpreter, "evaluate")
    assert inputs == {"x": ((32, 28, 28, 1), F32), "y": ((32,), I32), "sample_weight": ((32,), F32)}
    assert outputs == {"loss_sum": ((), F32), "correct": ((), F32)}
    assert manifest.signatures["evaluate"] == {
        "inputs": ["x", "y", "sample_weight"],
        "outputs": ["loss_sum", "correct"],
    }
    assert manifest.signatures["infer"] == {"inputs": ["x"], "outputs": ["output"]}


def test_mnist_manifest_tensors_match_the_interpreter(mnist_cnn):
    manifest = mnist_cnn.manifest
    assert manifest.task == "multiclass"
    assert manifest.batch_size == 32
    assert manifest.num_classes == 10
    assert (manifest.input.name, manifest.input.shape, manifest.input.dtype) == ("x", (32, 28, 28, 1), "float32")
    assert (manifest.label.name, manifest.label.shape, manifest.label.dtype) == ("y", (32,), "int32")
    assert manifest.loss == {"name": "sparse_categorical_crossentropy", "from_logits": False}
    assert manifest.optimizer == {"name": "sgd", "learning_rate": 0.02, "momentum": 0.0, "nesterov": False}


def test_mnist_weight_names_shapes_and_order(mnist_cnn, mnist_interpreter):
    manifest = mnist_cnn.manifest
    layers = [layer for layer in mnist_cnn.keras_model.layers if layer.trainable_weights]
    assert [type(layer).__name__ for layer in layers] == ["Conv2D", "Conv2D", "Dense", "Dense"]
    expected_names = [f"{layer.name}/{kind}" for layer in layers for kind in ("kernel", "bias")]
    assert expected_names[0].startswith("conv2d") and expected_names[0].endswith("/kernel")

    assert [w.name for w in manifest.weights] == expected_names
    assert [w.shape for w in manifest.weights] == MNIST_SHAPES
    assert all(w.dtype == "float32" for w in manifest.weights)
    assert manifest.optimizer_state == ()  # plain SGD keeps no state
    assert manifest.signatures["get_weights"] == {"inputs": [], "outputs": expected_names}
    assert manifest.signatures["set_weights"] == {"inputs": expected_names, "outputs": ["count"]}

    expected = {name: (shape, F32) for name, shape in zip(expected_names, MNIST_SHAPES, strict=True)}
    inputs, outputs = io(mnist_interpreter, "get_weights")
    assert inputs == {}
    assert outputs == expected
    inputs, outputs = io(mnist_interpreter, "set_weights")
    assert inputs == expected
    assert outputs == {"count": ((), I32)}


def test_mnist_parameter_count(mnist_cnn):
    assert mnist_cnn.manifest.num_parameters == 1_663_370
    assert mnist_cnn.keras_model.count_params() == 1_663_370
    assert json.loads(mnist_cnn.manifest_path.read_text())["num_parameters"] == 1_663_370


def test_manifest_on_disk_round_trips_and_hash_matches(mnist_cnn):
    on_disk = load_manifest(mnist_cnn.manifest_path)
    assert on_disk == mnist_cnn.manifest
    assert Manifest.from_json(on_disk.to_json()) == on_disk
    assert mnist_cnn.manifest_path == mnist_cnn.model_path.with_suffix(".json")
    tflite = mnist_cnn.model_path.read_bytes()
    assert tflite == mnist_cnn.tflite
    assert on_disk.model_sha256 == hashlib.sha256(tflite).hexdigest()


def test_mnist_is_builtin_only(mnist_cnn):
    summary = summarize_operators(mnist_cnn.tflite)
    assert summary.custom == ()
    assert summary.is_builtin_only
    assert summary.builtin  # the graph is made of builtin operators only
    assert not any(name.startswith("Flex") for name in summary.builtin)


def test_tabular_binary_adam_signatures(tabular):
    """Binary labels are float [B, 1]; Adam state is part of get/set_weights."""
    manifest = tabular.manifest
    b = manifest.batch_size
    interpreter = Interpreter(model_content=tabular.tflite)
    assert set(interpreter.get_signature_list()) == SIGNATURES

    inputs, outputs = io(interpreter, "train")
    assert inputs == {
        "x": ((b, 8), F32),
        "y": ((b, 1), F32),
        "sample_weight": ((b,), F32),
        "lr": ((1,), F32),
        "mu": ((1,), F32),
    }
    assert outputs == {"loss": ((), F32), "correct": ((), F32)}
    assert manifest.task == "binary" and manifest.num_classes == 2
    assert manifest.label.shape == (b, 1) and manifest.label.dtype == "float32"

    names = [w.name for w in manifest.weights]
    state = [s.name for s in manifest.optimizer_state]
    assert state[0] == "optimizer/iterations"
    assert set(state[1:]) == {f"optimizer/{slot}/{n}" for n in names for slot in ("m", "v")}
    shapes = {s.name: s.shape for s in manifest.all_weights}
    assert shapes["optimizer/iterations"] == (1,)  # a scalar, but no signature input may be rank 0
    for n in names:
        assert shapes[f"optimizer/m/{n}"] == shapes[n] == shapes[f"optimizer/v/{n}"]

    _, outputs = io(interpreter, "get_weights")
    assert outputs == {s.name: (s.shape, F32) for s in manifest.all_weights}
    inputs, _ = io(interpreter, "set_weights")
    assert inputs == {s.name: (s.shape, F32) for s in manifest.all_weights}
    assert manifest.signatures["get_weights"]["outputs"] == names + state


def test_regression_model_has_no_correct_output():
    import keras

    from converter import ConvertConfig, convert_model

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    converted = convert_model(
        model, ConvertConfig(batch_size=3, loss="mse", optimizer="sgd", momentum=0.5, verify=False)
    )
    manifest = converted.manifest
    interpreter = Interpreter(model_content=converted.tflite)

    inputs, outputs = io(interpreter, "train")
    assert inputs["y"] == ((3, 2), F32)
    assert outputs == {"loss": ((), F32)}
    _, outputs = io(interpreter, "evaluate")
    assert outputs == {"loss_sum": ((), F32)}
    assert manifest.task == "regression" and manifest.num_classes == 0
    assert manifest.signatures["train"]["outputs"] == ["loss"]
    assert manifest.signatures["evaluate"]["outputs"] == ["loss_sum"]
    assert [s.name for s in manifest.optimizer_state] == [f"optimizer/momentum/{w.name}" for w in manifest.weights]


@pytest.mark.parametrize("fixture", ["mnist_cnn", "tabular", "small_cnn"])
def test_no_signature_has_a_rank0_input(request, fixture):
    """ai-edge-litert's aarch64 SignatureRunner crashes resizing a rank-0 input (issue 9)."""
    converted = request.getfixturevalue(fixture)
    interpreter = Interpreter(model_content=converted.tflite)
    for name in SIGNATURES:
        inputs, _ = io(interpreter, name)
        assert all(shape != () for shape, _ in inputs.values()), (name, inputs)
    assert all(s.shape != () for s in converted.manifest.all_weights)


def test_plain_signature_runner_trains_the_converted_model(tabular):
    """Without litefed's runtime: LiteRT's own SignatureRunner, shape-[1] lr and mu, Adam's step counter."""
    manifest = tabular.manifest
    interpreter = Interpreter(model_content=tabular.tflite)
    b = manifest.batch_size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, 8)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    lr, mu = np.array([0.01], np.float32), np.array([0.0], np.float32)
    train = interpreter.get_signature_runner("train")
    losses = [float(train(x=x, y=y, sample_weight=np.ones(b, np.float32), lr=lr, mu=mu)["loss"]) for _ in range(5)]
    assert losses[-1] < losses[0]
    weights = interpreter.get_signature_runner("get_weights")()
    assert weights["optimizer/iterations"].shape == (1,) and float(weights["optimizer/iterations"][0]) == 5.0
