"""Transfer learning: frozen layers and frozen sub-models, and the layers a head needs.

Frozen weights become graph constants (not variables, not in get_weights,
set_weights or the manifest); the frozen part below the lowest trainable layer
runs forward only through TFLite's inference builtins; a frozen layer above it
passes only the input gradient. Parity is checked as in ``test_parity``: three
LiteRT train steps against Keras under ``tf.GradientTape`` from the same weights.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from converter import ConvertConfig, UnsupportedModelError, convert_model
from converter.frozen import FrozenPrefix
from converter.graph import TrainingModule
from converter.lowering import lower_model
from converter.optimizers import OptimizerConfig
from converter.reference import named_weights, reference_steps
from converter.verify import keras_probabilities
from edge_client.errors import WeightsError
from edge_client.model_file import summarize_operators
from edge_client.runtime import TrainableModel
from edge_client.weights import NamedArray
from tests.converter.test_parity import BATCH, SCE, SGD, TOLERANCE, Case, assert_parity, make_batches, run_litert
from tests.helpers import max_abs_diff

L = keras.layers
ADAM = OptimizerConfig("adam", 0.01)
MOMENTUM = OptimizerConfig("sgd", 0.1, momentum=0.9)  # a slot per tensor, and not scale-invariant as Adam is


def _randomise_batch_norm(model: keras.Model, rng: np.random.Generator) -> None:
    """Moving statistics and affine weights away from (0, 1), so a wrong BN mode would show."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            for var, (low, high) in zip(
                (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance),
                ((0.5, 1.5), (-0.3, 0.3), (-0.5, 0.5), (0.5, 2.0)),
                strict=True,
            ):
                var.assign(rng.uniform(low, high, var.shape).astype(np.float32))


def mobilenet_v2_base(input_shape=(16, 16, 3), seed: int = 0) -> keras.Model:
    """A MobileNetV2-style stem and one inverted-residual block at tiny widths."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="stem_pad")(inputs)
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    shortcut = x
    x = L.Conv2D(16, 1, use_bias=False, name="expand")(x)
    x = L.BatchNormalization(name="expand_bn")(x)
    x = L.ReLU(6.0, name="expand_relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="depthwise")(x)
    x = L.BatchNormalization(name="depthwise_bn")(x)
    x = L.ReLU(6.0, name="depthwise_relu")(x)
    x = L.Conv2D(8, 1, use_bias=False, name="project")(x)
    x = L.BatchNormalization(name="project_bn")(x)
    x = L.Add(name="residual")([shortcut, x])
    x = L.Conv2D(16, 1, use_bias=False, name="top_conv")(x)
    x = L.BatchNormalization(name="top_bn")(x)
    x = L.ReLU(6.0, name="top_relu")(x)
    base = keras.Model(inputs, x, name="mobilenet_base")
    _randomise_batch_norm(base, np.random.default_rng(seed))
    return base


def transfer_model(optimizer: OptimizerConfig = SGD, seed: int = 0) -> keras.Model:
    """TensorFlow's on-device personalisation recipe in small: frozen base, pooled, trainable head."""
    base = mobilenet_v2_base(seed=seed)
    base.trainable = False
    inputs = keras.Input((16, 16, 3))
    h = base(inputs, training=False)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    h = L.Dense(8, activation="relu", name="hidden")(h)
    outputs = L.Dense(3, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs, name="transfer")
    model.compile(loss=SCE, optimizer=_keras_optimizer(optimizer))
    return model


def _keras_optimizer(opt: OptimizerConfig) -> keras.optimizers.Optimizer:
    if opt.name == "adam":
        return keras.optimizers.Adam(opt.learning_rate, opt.beta_1, opt.beta_2, opt.epsilon)
    return keras.optimizers.SGD(opt.learning_rate)


def frozen(layer: keras.layers.Layer) -> keras.layers.Layer:
    layer.trainable = False
    return layer


def frozen_conv_stack():
    return [
        frozen(L.Conv2D(4, 3, padding="same", activation="relu", name="frozen_conv1")),
        frozen(L.Conv2D(6, 3, strides=2, activation="relu6", name="frozen_conv2")),
        L.Flatten(name="flatten"),
        L.Dense(3, activation="softmax", name="head"),
    ]


def frozen_dense_between():
    return [
        L.Dense(8, activation="relu", name="low"),
        frozen(L.Dense(8, activation="tanh", name="frozen_middle")),
        L.Dense(3, activation="softmax", name="head"),
    ]


def frozen_conv_between():
    return [
        L.Conv2D(4, 3, padding="same", activation="relu", name="low"),
        frozen(L.Conv2D(4, 3, padding="same", name="frozen_middle")),
        L.ReLU(6.0, name="clip"),
        L.GlobalAveragePooling2D(name="pool"),
        L.Dense(3, activation="softmax", name="head"),
    ]


def wide_inputs(rng: np.random.Generator, shape) -> np.ndarray:
    """Inputs in [-3, 12), so ReLU6 both clips at 6 and sees negatives."""
    return rng.uniform(-3.0, 12.0, shape)


SEQUENTIAL_CASES = [
    Case("frozen_conv_stack_dense_head", (8, 8, 2), frozen_conv_stack),
    Case("frozen_dense_between_trainable", (6,), frozen_dense_between, optimizer=MOMENTUM),
    Case("frozen_conv_between_trainable_gap", (6, 6, 2), frozen_conv_between, make_x=wide_inputs),
]


def _check_parity(model: keras.Model, case: Case, optimizer: OptimizerConfig):
    """Convert, compare infer and three train steps with Keras; return the conversion and runtime."""
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=False))
    manifest = converted.manifest
    trainable = named_weights(model)
    assert [w.name for w in manifest.weights] == list(trainable), "the manifest must hold the trainable tensors only"
    assert not summarize_operators(converted.tflite).custom

    batches = make_batches(manifest, case, seed=1)
    runtime = TrainableModel(converted.tflite, manifest)
    infer_diff = max_abs_diff(runtime.infer_batch(batches[0].x), keras_probabilities(model, batches[0].x, "", False))
    assert infer_diff <= TOLERANCE, f"infer differs from Keras by {infer_diff:.3g}"
    got_losses, got_weights = run_litert(runtime, batches, optimizer.learning_rate)
    ref_losses, ref_weights = reference_steps(model, SCE, False, optimizer, batches, optimizer.learning_rate)
    assert_parity(got_losses, got_weights, ref_losses, ref_weights)
    moved = max(max_abs_diff(got_weights[n], trainable[n]) for n in trainable)
    assert moved > 1e-3, f"training barely changed the weights ({moved:.3g})"
    return converted, runtime


def _signature_inputs(tflite: bytes, name: str) -> set[str]:
    return set(Interpreter(model_content=tflite).get_signature_list()[name]["inputs"])


@pytest.mark.parametrize("case", SEQUENTIAL_CASES, ids=[c.id for c in SEQUENTIAL_CASES])
def test_frozen_layers_match_keras_and_are_constants(case: Case):
    model = case.build()
    frozen_names = {f"{layer.name}/{v.name}" for layer in model.layers for v in layer.non_trainable_weights}
    assert frozen_names, "the case must freeze something"
    converted, runtime = _check_parity(model, case, case.optimizer)
    tensors = {w.name for w in runtime.get_weights(include_optimizer=True)}
    assert not tensors & frozen_names
    assert not _signature_inputs(converted.tflite, "set_weights") & frozen_names


def test_frozen_conv_stack_runs_as_inference_builtins():
    """Below the lowest trainable layer the frozen convolutions are CONV_2D with constant filters."""
    case = SEQUENTIAL_CASES[0]
    model = case.build()
    ops = lower_model(model)
    assert isinstance(ops[0], FrozenPrefix) and [b.name for b in ops[0].blocks] == [
        "frozen_conv1",
        "frozen_conv2",
        "flatten",
    ]
    assert sum(len(op.params) for op in ops) == 2  # head kernel and bias
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=False))
    assert "CONV_2D" in summarize_operators(converted.tflite).builtin


def test_frozen_mobilenet_base_matches_keras():
    """A frozen nested MobileNetV2-style base (BN, DepthwiseConv2D, ReLU6, ZeroPadding2D, residual Add)."""
    model = transfer_model(ADAM)
    case = Case("transfer", (16, 16, 3), lambda: [], make_x=wide_inputs)
    converted, runtime = _check_parity(model, case, ADAM)
    assert [w.name for w in converted.manifest.weights] == ["hidden/kernel", "hidden/bias", "head/kernel", "head/bias"]
    # Variables exist for the four trainable tensors only, none for the base's 25.
    module = TrainingModule(_spec(model))
    assert len(module.weights) == 4 and len(module.anchors) == 4
    assert len(model.get_layer("mobilenet_base").weights) == 25
    builtin = summarize_operators(converted.tflite).builtin
    assert "DEPTHWISE_CONV_2D" in builtin and "CONV_2D" in builtin
    assert _signature_inputs(converted.tflite, "set_weights") == {
        *[w.name for w in converted.manifest.weights],
        *[s.name for s in converted.manifest.optimizer_state],
    }
    weights = runtime.get_weights()
    weights[0] = NamedArray("stem_conv/kernel", np.zeros((3, 3, 3, 8), np.float32))
    with pytest.raises(WeightsError):
        runtime.set_weights(weights)


def test_frozen_branches_in_a_flat_functional_graph_match_keras():
    """Layers frozen one by one in the model's own graph (no nested model): the residual part is cut out whole."""
    base = mobilenet_v2_base(seed=4)
    for layer in base.layers:
        layer.trainable = False
    h = L.GlobalAveragePooling2D(name="pool")(base.output)
    model = keras.Model(base.input, L.Dense(3, activation="softmax", name="head")(h), name="flat_transfer")
    model.compile(loss=SCE, optimizer=keras.optimizers.SGD(SGD.learning_rate))
    ops = lower_model(model)
    assert isinstance(ops[0], FrozenPrefix) and [type(op).__name__ for op in ops[1:]] == [
        "Dense",
        "Activation",
    ]
    _check_parity(model, Case("flat", (16, 16, 3), lambda: [], make_x=wide_inputs), SGD)


def _spec(model: keras.Model):
    from converter.api import build_graph_spec, resolve_optimizer

    config = ConvertConfig(batch_size=BATCH, verify=False)
    return build_graph_spec(model, config, resolve_optimizer(model, config))[0]


def test_frozen_base_matches_keras_fit():
    """Keras' own fit step (training=True), not just the tape reference: a frozen BN keeps its statistics.

    Unit sample weights, where Keras' fit and litefed reduce the loss the same way.
    """
    model = transfer_model(SGD)
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=False))
    runtime = TrainableModel(converted.tflite, converted.manifest)
    rng = np.random.default_rng(5)
    x = rng.uniform(-3.0, 12.0, (BATCH, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 3, BATCH).astype(np.int32)
    base = model.get_layer("mobilenet_base")
    base_before = [np.array(keras.ops.convert_to_numpy(v)) for v in base.weights]
    loss = runtime.train_step(x, y, np.ones(BATCH, np.float32), lr=SGD.learning_rate).loss
    keras_loss = float(model.train_on_batch(x, y))
    assert abs(loss - keras_loss) <= TOLERANCE
    for name, array in named_weights(model).items():
        got = next(w.array for w in runtime.get_weights() if w.name == name)
        assert max_abs_diff(got, array) <= TOLERANCE, name
    for before, var in zip(base_before, base.weights, strict=True):
        assert np.array_equal(before, keras.ops.convert_to_numpy(var)), f"Keras' fit changed {var.path}"


@pytest.mark.parametrize(
    "layers, match",
    [
        (lambda: [frozen(L.Dense(4, name="f")), L.Dropout(0.3, name="bad"), frozen(L.Dense(4)), L.Dense(2)], "Dropout"),
        (
            lambda: [frozen(L.Dense(4, name="f")), L.GaussianNoise(0.1, name="bad"), frozen(L.Dense(4)), L.Dense(2)],
            "GaussianNoise",
        ),
        (lambda: [frozen(L.Dense(4, kernel_regularizer="l2", name="bad")), L.Dense(2)], "kernel_regularizer"),
    ],
    ids=["dropout_in_frozen_part", "unsupported_frozen_layer", "regularized_frozen_layer"],
)
def test_what_the_frozen_part_cannot_do_is_refused_naming_the_layer(layers, match):
    model = keras.Sequential([keras.Input((6,)), *layers()])
    with pytest.raises(UnsupportedModelError, match=match) as info:
        convert_model(model, ConvertConfig(batch_size=2, loss=SCE, verify=False))
    assert "'bad'" in str(info.value) and "frozen part" in str(info.value)


def test_dropout_above_the_frozen_part_is_kept():
    """The recipe's Dropout between the pooled features and the head trains as Dropout; the pooling runs frozen."""
    base = mobilenet_v2_base()
    base.trainable = False
    model = keras.Sequential([keras.Input((16, 16, 3)), base, L.GlobalMaxPooling2D(), L.Dropout(0.2), L.Dense(2)])
    kinds = [type(op).__name__ for op in lower_model(model)]
    assert kinds == ["FrozenPrefix", "Dropout", "Dense"]


def test_fully_frozen_model_says_so():
    model = keras.Sequential([keras.Input((6,)), frozen(L.Dense(4)), frozen(L.Dense(2))])
    with pytest.raises(UnsupportedModelError, match="all its layers are frozen"):
        convert_model(model, ConvertConfig(batch_size=2, loss=SCE, verify=False))


def test_frozen_layer_is_not_reported_as_missing_weights():
    """The old message was "expected weights ['kernel', 'bias'], found 0 tensors"."""
    model = keras.Sequential([keras.Input((6,)), L.Dense(4), frozen(L.Dense(4)), L.Dense(2)])
    assert [type(op).__name__ for op in lower_model(model)] == ["Dense", "Frozen", "Dense"]


def test_trainable_layer_inside_a_branch_is_refused_with_the_real_cause():
    """A partly trainable MobileNet base: the error names the merge, not "does not simply follow"."""
    base = mobilenet_v2_base()
    for layer in base.layers:
        layer.trainable = layer.name == "expand"
    inputs = keras.Input((16, 16, 3))
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling2D()(base(inputs)))
    model = keras.Model(inputs, outputs)
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(model, ConvertConfig(batch_size=2, loss=SCE, verify=False))
    message = str(info.value)
    assert "'residual'" in message and "expand" in message and "frozen" in message
    assert "does not simply follow" not in message


def test_trainable_nested_model_is_flattened():
    """A trainable nested Sequential trains exactly as the same layers in one chain."""
    keras.utils.set_random_seed(3)
    inner = keras.Sequential(
        [keras.Input((6,)), L.Dense(8, activation="relu", name="inner1"), L.Dense(8, name="inner2")], name="inner"
    )
    head = L.Dense(3, activation="softmax", name="head")
    nested = keras.Sequential([keras.Input((6,)), inner, head], name="nested")
    flat = keras.Sequential([keras.Input((6,)), *inner.layers, head], name="flat")
    converted = convert_model(nested, ConvertConfig(batch_size=BATCH, loss=SCE, optimizer="sgd", verify=False))
    assert [w.name for w in converted.manifest.weights] == list(named_weights(flat))
    case = Case("nested", (6,), lambda: [])
    batches = make_batches(converted.manifest, case, seed=2)
    runtime = TrainableModel(converted.tflite, converted.manifest)
    lr = converted.manifest.optimizer["learning_rate"]
    got_losses, got_weights = run_litert(runtime, batches, lr)
    ref_losses, ref_weights = reference_steps(flat, SCE, False, OptimizerConfig("sgd", lr), batches, lr)
    assert_parity(got_losses, got_weights, ref_losses, ref_weights)


HEAD_CASES = [
    Case("global_max_pool", (6, 6, 2), lambda: [_stem(), L.GlobalMaxPooling2D(), L.Dense(3, activation="softmax")]),
    Case(
        "global_avg_pool_keepdims",
        (6, 6, 2),
        lambda: [_stem(), L.GlobalAveragePooling2D(keepdims=True), L.Flatten(), L.Dense(3, activation="softmax")],
    ),
    Case(
        "relu6_leaky_relu",
        (6,),
        lambda: [
            L.Dense(8, activation="relu6"),
            L.Dense(8, activation="leaky_relu"),
            L.Dense(8),
            L.LeakyReLU(0.3),
            L.Dense(8),
            L.ReLU(max_value=2.5),
            L.Dense(3, activation="softmax"),
        ],
        make_x=wide_inputs,
    ),
]


def _stem():
    return L.Conv2D(3, 2, padding="same", activation="relu", name="stem")


@pytest.mark.parametrize("case", HEAD_CASES, ids=[c.id for c in HEAD_CASES])
def test_head_layers_match_keras(case: Case):
    model = case.build()
    _check_parity(model, case, case.optimizer)


def test_relu6_case_really_clips():
    """The ReLU6 case is honest: some pre-activations pass 6 and some are negative."""
    model = HEAD_CASES[-1].build()
    x = wide_inputs(np.random.default_rng(1), (BATCH, 6)).astype(np.float32)
    pre = keras.ops.convert_to_numpy(model.layers[0].kernel)
    z = x @ pre + keras.ops.convert_to_numpy(model.layers[0].bias)
    assert (z > 6).any() and (z < 0).any()


def test_keras_applications_mobilenet_v2_base_converts_and_verifies():
    """The real recipe: keras.applications.MobileNetV2 (alpha 0.35, 32x32, random weights) frozen under a head."""
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None)
    base.trainable = False
    inputs = keras.Input((32, 32, 3))
    features = L.GlobalAveragePooling2D()(base(inputs, training=False))
    model = keras.Model(inputs, L.Dense(3, activation="softmax", name="head")(features))
    model.compile(loss=SCE, optimizer=keras.optimizers.SGD(0.1))
    converted = convert_model(model, ConvertConfig(batch_size=2, verify=True, tolerance=TOLERANCE))
    assert converted.report is not None and converted.report.worst <= TOLERANCE
    assert [w.name for w in converted.manifest.weights] == ["head/kernel", "head/bias"]


def test_frozen_nested_models_above_a_trainable_layer_are_lowered_with_constants():
    inner = keras.Sequential([keras.Input((8,)), L.Dense(8), keras.Sequential([keras.Input((8,)), L.Dense(8, "tanh")])])
    inner.trainable = False
    model = keras.Sequential([keras.Input((6,)), L.Dense(8), inner, L.Dense(3)])
    assert [type(op).__name__ for op in lower_model(model)] == ["Dense", "Frozen", "Frozen", "Activation", "Dense"]


def test_frozen_branching_model_above_a_trainable_layer_is_refused():
    base = mobilenet_v2_base()
    base.trainable = False
    inputs = keras.Input((16, 16, 3))
    h = base(L.Conv2D(3, 1, name="trainable_stem")(inputs))
    model = keras.Model(inputs, L.Dense(2)(L.Flatten()(h)))
    with pytest.raises(UnsupportedModelError, match="'mobilenet_base' branches and sits above the lowest trainable"):
        lower_model(model)


def every_other_frozen_layer_base(seed: int = 5) -> keras.Model:
    """The frozen-part layers the MobileNetV2-style base does not use, each at least once."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 2))
    x = L.Rescaling(1 / 2.0, offset=-0.25, name="rescale")(inputs)
    x = L.SeparableConv2D(4, 3, padding="same", name="separable")(x)
    x = L.LeakyReLU(0.2, name="leaky")(x)
    x = L.Cropping2D(((1, 1), (1, 1)), name="crop")(x)  # 10x10
    a = L.MaxPooling2D(2, name="max_pool")(x)  # 5x5
    b = L.AveragePooling2D(2, name="avg_pool")(x)
    x = L.Multiply(name="gate")([a, L.Activation("sigmoid", name="sigmoid")(b)])
    x = L.Concatenate(name="concat")([x, b])  # 5x5x8
    x = L.UpSampling2D(2, name="upsample")(x)  # 10x10x8
    x = L.Conv2D(4, 3, strides=2, name="down")(x)  # 4x4x4
    x = L.GlobalMaxPooling2D(keepdims=True, name="global_max")(x)
    x = L.Reshape((4,), name="reshape")(x)
    x = L.Dense(6, name="dense")(x)
    x = L.Softmax(name="softmax")(x)
    return keras.Model(inputs, x, name="other_base")


def test_every_other_frozen_part_layer_matches_keras_and_stays_builtin():
    """SeparableConv2D, Cropping2D, UpSampling2D, Multiply, Concatenate, Rescaling, pools... in a frozen base."""
    base = every_other_frozen_layer_base()
    base.trainable = False
    inputs = keras.Input((12, 12, 2))
    outputs = L.Dense(3, activation="softmax", name="head")(base(inputs, training=False))
    model = keras.Model(inputs, outputs, name="other_transfer")
    model.compile(loss=SCE, optimizer=keras.optimizers.SGD(SGD.learning_rate))
    converted, _ = _check_parity(model, Case("other", (12, 12, 2), lambda: [], make_x=wide_inputs), SGD)
    assert [w.name for w in converted.manifest.weights] == ["head/kernel", "head/bias"]
