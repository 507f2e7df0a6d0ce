"""Parity of the converted (LiteRT) training step with Keras/TensorFlow.

Every case converts one tiny Keras model with ``verify=False``, runs three
``train`` steps in LiteRT on random data with random sample weights (the last
example of every batch has weight 0), and compares every step's loss and the
final weights with :func:`converter.reference.reference_steps` (Keras layers,
Keras loss and Keras optimizer under ``tf.GradientTape``) on the same batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import pytest

from converter import ConvertConfig, convert_model
from converter.optimizers import OptimizerConfig
from converter.reference import Batch, named_weights, reference_steps
from converter.verify import keras_probabilities, random_batches
from edge_client.runtime import TrainableModel
from edge_client.weights import NamedArray
from tests.helpers import max_abs_diff

BATCH = 4
STEPS = 3
TOLERANCE = 1e-5
L = keras.layers

SCE = "sparse_categorical_crossentropy"
BCE = "binary_crossentropy"
MSE = "mean_squared_error"
SGD = OptimizerConfig("sgd", learning_rate=0.1)


def uniform01(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.uniform(0.0, 1.0, shape)


@dataclass(frozen=True)
class Case:
    """One small model: layers after the input, loss and optimizer."""

    id: str
    input_shape: tuple[int, ...]
    layers: Callable[[], list]
    loss: str = SCE
    from_logits: bool = False
    optimizer: OptimizerConfig = SGD
    make_x: Callable[[np.random.Generator, tuple], np.ndarray] = field(default=uniform01)
    # When True the loss/optimizer go through ConvertConfig instead of model.compile.
    via_config: bool = False

    def build(self, seed: int = 0) -> keras.Model:
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input(self.input_shape), *self.layers()], name=self.id)
        if not self.via_config:
            model.compile(loss=_keras_loss(self.loss, self.from_logits), optimizer=_keras_optimizer(self.optimizer))
        return model

    def config(self) -> ConvertConfig:
        if not self.via_config:
            return ConvertConfig(batch_size=BATCH, verify=False)
        opt = self.optimizer
        return ConvertConfig(
            batch_size=BATCH,
            loss=self.loss,
            from_logits=self.from_logits,
            optimizer=opt.name,
            learning_rate=opt.learning_rate,
            momentum=opt.momentum if opt.name == "sgd" else None,
            nesterov=opt.nesterov if opt.name == "sgd" else None,
            verify=False,
        )


def _keras_loss(loss: str, from_logits: bool) -> keras.losses.Loss:
    if loss == SCE:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    if loss == BCE:
        return keras.losses.BinaryCrossentropy(from_logits=from_logits)
    return keras.losses.MeanSquaredError()


def _keras_optimizer(opt: OptimizerConfig) -> keras.optimizers.Optimizer:
    if opt.name == "adam":
        return keras.optimizers.Adam(opt.learning_rate, opt.beta_1, opt.beta_2, opt.epsilon)
    return keras.optimizers.SGD(opt.learning_rate, momentum=opt.momentum, nesterov=opt.nesterov)


def stem(**kwargs):
    """A first Conv2D, so that the layer under test also back-propagates to its input."""
    return L.Conv2D(3, 2, padding="same", activation="relu", name="stem", **kwargs)


def conv_net(*under_test):
    return lambda: [stem(), *under_test, L.Flatten(), L.Dense(3, activation="softmax")]


def negative_inputs(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.uniform(-1.0, 0.2, shape)


def pixel_inputs(rng: np.random.Generator, shape) -> np.ndarray:
    return np.round(rng.uniform(0.0, 255.0, shape))


CASES = [
    # Dense and its activations.
    Case("dense_relu", (6,), lambda: [L.Dense(8, activation="relu"), L.Dense(3, activation="softmax")]),
    Case("dense_tanh", (6,), lambda: [L.Dense(8, activation="tanh"), L.Dense(3, activation="softmax")]),
    Case("dense_sigmoid_hidden", (6,), lambda: [L.Dense(8, activation="sigmoid"), L.Dense(3, activation="softmax")]),
    Case(
        "dense_relu_no_bias",
        (6,),
        lambda: [L.Dense(8, activation="relu", use_bias=False), L.Dense(3, activation="softmax")],
    ),
    Case(
        "dense_tanh_no_bias",
        (6,),
        lambda: [L.Dense(8, activation="tanh", use_bias=False), L.Dense(3, activation="softmax")],
    ),
    # Conv2D: strides, paddings, odd sizes, no bias.
    Case("conv_s1_same", (8, 8, 2), conv_net(L.Conv2D(4, 3, padding="same", activation="relu"))),
    Case("conv_s1_valid", (8, 8, 2), conv_net(L.Conv2D(4, 3, padding="valid", activation="relu"))),
    Case("conv_k2_s1_same_asymmetric_pad", (7, 7, 2), conv_net(L.Conv2D(4, 2, padding="same", activation="relu"))),
    Case("conv_k4_s1_same_asymmetric_pad", (8, 8, 2), conv_net(L.Conv2D(4, 4, padding="same"))),
    Case("conv_s2_same", (8, 8, 2), conv_net(L.Conv2D(4, 3, strides=2, padding="same", activation="relu"))),
    Case("conv_s2_valid_odd_9x9", (9, 9, 2), conv_net(L.Conv2D(4, 3, strides=2, padding="valid"))),
    Case("conv_s2_valid_even_8x8_unused_edge", (8, 8, 2), conv_net(L.Conv2D(4, 3, strides=2, padding="valid"))),
    Case("conv_k4_s2_same_odd_7x7", (7, 7, 2), conv_net(L.Conv2D(4, 4, strides=2, padding="same", activation="tanh"))),
    Case("conv_rect_kernel_strides", (8, 7, 2), conv_net(L.Conv2D(4, (3, 2), strides=(2, 1), padding="same"))),
    Case("conv_no_bias", (6, 6, 3), conv_net(L.Conv2D(4, 3, padding="same", use_bias=False, activation="relu"))),
    # Pooling.
    Case("maxpool_2x2", (8, 8, 2), conv_net(L.MaxPooling2D(2))),
    Case("maxpool_2x2_valid_odd_7x7", (7, 7, 2), conv_net(L.MaxPooling2D(2))),
    Case("maxpool_3_s2_same_overlapping", (7, 7, 2), conv_net(L.MaxPooling2D(3, strides=2, padding="same"))),
    Case("maxpool_3_s1_valid_overlapping", (6, 6, 2), conv_net(L.MaxPooling2D(3, strides=1))),
    Case("avgpool_valid", (8, 8, 2), conv_net(L.AveragePooling2D(2))),
    Case("avgpool_same_partial_7x7", (7, 7, 2), conv_net(L.AveragePooling2D(2, padding="same"))),
    Case("avgpool_3_s2_same_overlapping", (7, 7, 2), conv_net(L.AveragePooling2D(3, strides=2, padding="same"))),
    # Max-pool ties: ReLU zeros everywhere (negative-biased inputs and bias).
    Case(
        "maxpool_ties_relu_zeros",
        (8, 8, 2),
        lambda: [
            L.Conv2D(
                4, 3, padding="same", activation="relu", bias_initializer=keras.initializers.Constant(-0.2), name="stem"
            ),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(3, activation="softmax"),
        ],
        make_x=negative_inputs,
    ),
    # Max-pool ties among equal *positive* values: every unit of the Dense layer
    # starts identical, so which window position receives the gradient decides
    # which kernel column moves.
    Case(
        "maxpool_ties_equal_values",
        (6,),
        lambda: [
            L.Dense(
                32, activation="relu", kernel_initializer=keras.initializers.Constant(0.1), bias_initializer="ones"
            ),
            L.Reshape((4, 4, 2)),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(3, activation="softmax"),
        ],
    ),
    Case(
        "maxpool_ties_equal_values_overlapping",
        (6,),
        lambda: [
            L.Dense(
                50, activation="relu", kernel_initializer=keras.initializers.Constant(0.1), bias_initializer="ones"
            ),
            L.Reshape((5, 5, 2)),
            L.MaxPooling2D(3, strides=2, padding="same"),
            L.Flatten(),
            L.Dense(3, activation="softmax"),
        ],
    ),
    # Shape layers and Rescaling.
    Case(
        "dense_reshape_conv",
        (12,),
        lambda: [
            L.Dense(32, activation="relu"),
            L.Reshape((4, 4, 2)),
            L.Conv2D(2, 3),
            L.Flatten(),
            L.Dense(3, activation="softmax"),
        ],
    ),
    Case(
        "rescaling_input_and_hidden",
        (6,),
        lambda: [
            L.Rescaling(1.0 / 255, offset=-0.5),
            L.Dense(8, activation="relu"),
            L.Rescaling(0.5, offset=0.25),
            L.Dense(3, activation="softmax"),
        ],
        make_x=pixel_inputs,
    ),
    Case(
        "rescaling_conv",
        (6, 6, 3),
        lambda: [
            L.Rescaling(1.0 / 255, offset=-1.0),
            L.Conv2D(4, 3, activation="relu"),
            L.Flatten(),
            L.Dense(3, activation="softmax"),
        ],
        make_x=pixel_inputs,
    ),
    # Activation layers, ReLU and Softmax layers.
    Case(
        "activation_layers",
        (6,),
        lambda: [
            L.Dense(8),
            L.Activation("relu"),
            L.Dense(8),
            L.Activation("tanh"),
            L.Dense(8),
            L.Activation("sigmoid"),
            L.Dense(8),
            L.Activation("linear"),
            L.Dense(8),
            L.Activation("softmax"),
            L.Dense(3),
            L.Activation("softmax"),
        ],
    ),
    Case("relu_layer_softmax_layer_output", (6,), lambda: [L.Dense(8), L.ReLU(), L.Dense(3), L.Softmax()]),
    Case("softmax_layer_hidden", (6,), lambda: [L.Dense(8), L.Softmax(), L.Dense(3, activation="softmax")]),
    # Losses.
    Case("sce_softmax_fused", (6,), lambda: [L.Dense(8, activation="relu"), L.Dense(4, activation="softmax")]),
    Case("sce_from_logits", (6,), lambda: [L.Dense(8, activation="relu"), L.Dense(4)], from_logits=True),
    Case("bce_sigmoid", (6,), lambda: [L.Dense(8, activation="relu"), L.Dense(1, activation="sigmoid")], loss=BCE),
    Case(
        "bce_sigmoid_multilabel",
        (6,),
        lambda: [L.Dense(8, activation="relu"), L.Dense(3, activation="sigmoid")],
        loss=BCE,
    ),
    Case("bce_from_logits", (6,), lambda: [L.Dense(8, activation="relu"), L.Dense(1)], loss=BCE, from_logits=True),
    Case("mse_3_outputs", (6,), lambda: [L.Dense(8, activation="relu"), L.Dense(3)], loss=MSE),
    Case("mse_tanh_output", (6,), lambda: [L.Dense(8, activation="relu"), L.Dense(3, activation="tanh")], loss=MSE),
    # Optimizers (on a conv + pool + dense model); some through ConvertConfig flags.
    Case("sgd_plain", (6, 6, 2), conv_net(L.MaxPooling2D(2)), optimizer=OptimizerConfig("sgd", 0.1)),
    Case("sgd_momentum", (6, 6, 2), conv_net(L.MaxPooling2D(2)), optimizer=OptimizerConfig("sgd", 0.05, momentum=0.9)),
    Case(
        "sgd_nesterov_via_config",
        (6, 6, 2),
        conv_net(L.MaxPooling2D(2)),
        optimizer=OptimizerConfig("sgd", 0.05, momentum=0.9, nesterov=True),
        via_config=True,
    ),
    Case("adam", (6, 6, 2), conv_net(L.MaxPooling2D(2)), optimizer=OptimizerConfig("adam", 0.01)),
    Case(
        "adam_via_config_bce_logits",
        (6,),
        lambda: [L.Dense(8, activation="tanh"), L.Dense(2)],
        loss=BCE,
        from_logits=True,
        optimizer=OptimizerConfig("adam", 0.005),
        via_config=True,
    ),
]


def make_batches(manifest, case: Case, seed: int, steps: int = STEPS) -> list[Batch]:
    """Random batches for ``manifest`` with the case's inputs; random weights, the last one 0 (padding)."""
    return random_batches(manifest, steps, seed, make_x=case.make_x, weight_range=(0.2, 2.0))


def run_litert(runtime: TrainableModel, batches: list[Batch], lr: float, mu: float = 0.0):
    losses = [runtime.train_step(b.x, b.y, b.sample_weight, lr=lr, mu=mu).loss for b in batches]
    return losses, {w.name: w.array for w in runtime.get_weights()}


def assert_parity(got_losses, got_weights, ref_losses, ref_weights, tolerance=TOLERANCE):
    assert set(got_weights) == set(ref_weights), "weight names differ from the Keras model's"
    loss_diff = max_abs_diff(got_losses, ref_losses)
    assert loss_diff <= tolerance, f"losses differ by {loss_diff:.3g}: LiteRT {got_losses} vs Keras {ref_losses}"
    for name, array in got_weights.items():
        diff = max_abs_diff(array, ref_weights[name])
        assert diff <= tolerance, f"weight {name!r} differs by {diff:.3g} after {len(got_losses)} steps"


# One case per layer family and optimizer runs in the fast loop (-m "not slow"); the sweep is slow.
FAST_CASES = {"dense_relu", "conv_s1_same", "maxpool_3_s2_same_overlapping", "avgpool_valid", "adam", "sce_from_logits"}


def _marked(case: Case):
    return pytest.param(case, id=case.id, marks=() if case.id in FAST_CASES else pytest.mark.slow)


@pytest.mark.parametrize("case", [_marked(c) for c in CASES])
def test_train_steps_match_tensorflow(case: Case):
    model = case.build()
    converted = convert_model(model, case.config())
    manifest = converted.manifest
    assert manifest.loss == {"name": case.loss, "from_logits": case.from_logits}
    assert manifest.optimizer == case.optimizer.to_json()
    assert [w.name for w in manifest.weights] == [
        f"{layer.name}/{v.name}" for layer in model.layers for v in layer.trainable_weights
    ]

    batches = make_batches(manifest, case, seed=1)
    runtime = TrainableModel(converted.tflite, manifest)

    # Inference before training: probabilities (or outputs) equal Keras'.
    expected = keras_probabilities(model, batches[0].x, manifest.task, case.from_logits)
    infer_diff = max_abs_diff(runtime.infer_batch(batches[0].x), expected)
    assert infer_diff <= TOLERANCE, f"infer differs from Keras by {infer_diff:.3g}"

    lr = case.optimizer.learning_rate
    got_losses, got_weights = run_litert(runtime, batches, lr)
    ref_losses, ref_weights = reference_steps(model, case.loss, case.from_logits, case.optimizer, batches, lr)
    assert_parity(got_losses, got_weights, ref_losses, ref_weights)

    # The steps did something: otherwise equal weights would prove nothing.
    initial = named_weights(model)
    moved = max(max_abs_diff(got_weights[n], initial[n]) for n in initial)
    assert moved > 1e-3, f"training barely changed the weights ({moved:.3g})"


def _window_ties(activations: np.ndarray, pool: int) -> int:
    """How many non-overlapping pool x pool windows have their maximum more than once."""
    n, h, w, c = activations.shape
    h, w = h - h % pool, w - w % pool
    windows = activations[:, :h, :w, :].reshape(n, h // pool, pool, w // pool, pool, c)
    maxima = windows.max(axis=(2, 4), keepdims=True)
    return int(((windows == maxima).sum(axis=(2, 4)) > 1).sum())


def test_every_fast_case_exists():
    assert set(FAST_CASES).issubset(c.id for c in CASES)


@pytest.mark.parametrize("case_id", ["maxpool_ties_relu_zeros", "maxpool_ties_equal_values"])
def test_tie_cases_really_have_ties(case_id: str):
    """The tie cases above are honest: many pooling windows have several maxima."""
    case = next(c for c in CASES if c.id == case_id)
    model = case.build()
    x = case.make_x(np.random.default_rng(1), (BATCH, *case.input_shape)).astype(np.float32)
    pool_index = next(i for i, layer in enumerate(model.layers) if isinstance(layer, L.MaxPooling2D))
    before_pool = keras.Model(model.inputs[0], model.layers[pool_index - 1].output)(x)
    ties = _window_ties(keras.ops.convert_to_numpy(before_pool), 2)
    assert ties >= 10, f"only {ties} windows with tied maxima"


def _fedprox_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            L.Conv2D(3, 3, activation="relu", name="conv"),
            L.Flatten(name="flatten"),
            L.Dense(6, activation="tanh", name="hidden"),
            L.Dense(3, activation="softmax", name="out"),
        ],
        name=f"fedprox_{seed}",
    )
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(0.2))
    return model


@pytest.mark.parametrize("optimizer", [OptimizerConfig("sgd", 0.2), OptimizerConfig("adam", 0.01)], ids=["sgd", "adam"])
def test_fedprox_matches_tensorflow_with_anchor_from_set_weights(optimizer: OptimizerConfig):
    """mu > 0 adds mu/2 * ||w - anchor||^2; the anchor is what set_weights loaded.

    The model is converted from one initialisation and then loaded with the
    weights of another, so the test fails if set_weights did not move the anchor.
    """
    mu = 0.5
    converted_from = _fedprox_model(seed=10)
    config = ConvertConfig(
        batch_size=BATCH, optimizer=optimizer.name, learning_rate=optimizer.learning_rate, verify=False
    )
    converted = convert_model(converted_from, config)
    start = _fedprox_model(seed=11)
    runtime = TrainableModel(converted.tflite, converted.manifest)
    start_weights = named_weights(start)
    runtime.set_weights([NamedArray(spec.name, start_weights[spec.name]) for spec in converted.manifest.weights])
    case = Case("fedprox", (6, 6, 2), lambda: [])
    batches = make_batches(converted.manifest, case, seed=3)
    lr = optimizer.learning_rate

    got_losses, got_weights = run_litert(runtime, batches, lr, mu=mu)
    ref_losses, ref_weights = reference_steps(start, SCE, False, optimizer, batches, lr, mu=mu)
    assert_parity(got_losses, got_weights, ref_losses, ref_weights)

    # The proximal term mattered: without it the weights end up elsewhere.
    _, plain_weights = reference_steps(start, SCE, False, optimizer, batches, lr, mu=0.0)
    effect = max(max_abs_diff(ref_weights[n], plain_weights[n]) for n in ref_weights)
    assert effect > 1e-4, f"mu={mu} changed the weights by only {effect:.3g}; the test would not notice FedProx"
