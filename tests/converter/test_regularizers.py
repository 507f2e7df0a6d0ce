"""L1, L2 and L1L2 weight regularizers train as in Keras: penalty in the loss, its gradient in the step.

Keras 3's ``train_on_batch`` loss is the data loss plus the penalties of the
trainable weights (checked here against ``model.losses``); frozen layers add
none. Each case converts once and compares 3 LiteRT steps with Keras'.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pytest

from converter import UnsupportedModelError, convert_model
from converter.api import ConvertConfig
from converter.regularizers import regularizer_of
from converter.verify import random_batches
from tests.converter.keras_steps import L, compiled, convert, keras_train_on_batch, litert_steps, roundtrip_is_exact
from tests.helpers import max_abs_diff

BATCH = 4
STEPS = 3
TOLERANCE = 1e-5
R = keras.regularizers
OPT = keras.optimizers
SCE = "sparse_categorical_crossentropy"


@dataclass(frozen=True)
class Case:
    id: str
    layers: object  # () -> list of layers
    input_shape: tuple[int, ...]
    optimizer: object  # () -> optimizer


CASES = [
    Case(
        "dense_l2_kernel_sgd_momentum",
        lambda: [L.Dense(6, "tanh", kernel_regularizer=R.L2(0.05), name="h"), L.Dense(3, "softmax", name="o")],
        (5,),
        lambda: OPT.SGD(0.1, momentum=0.5),
    ),
    Case(  # zero-initialised biases: the first step's L1 gradient is sign(0) = 0, as TensorFlow's
        "dense_l1_bias_adam",
        lambda: [L.Dense(6, "relu", bias_regularizer=R.L1(0.05), name="h"), L.Dense(3, "softmax", name="o")],
        (5,),
        lambda: OPT.Adam(0.02),
    ),
    Case(
        "dense_l1l2_and_strings_adam",
        lambda: [
            L.Dense(6, "tanh", kernel_regularizer=R.L1L2(0.01, 0.02), bias_regularizer="l2", name="h"),
            L.Dense(3, "softmax", kernel_regularizer="l1", name="o"),
        ],
        (5,),
        lambda: OPT.Adam(0.02),
    ),
    Case(
        "conv2d_l2_sgd",
        lambda: [
            L.Conv2D(3, 3, activation="relu", kernel_regularizer=R.L2(0.1), name="c"),
            L.Flatten(name="f"),
            L.Dense(2, "softmax", name="o"),
        ],
        (5, 5, 2),
        lambda: OPT.SGD(0.1),
    ),
    Case(
        "conv2d_l2_adam",
        lambda: [
            L.Conv2D(3, 3, activation="relu", kernel_regularizer=R.L2(0.1), name="c"),
            L.Flatten(name="f"),
            L.Dense(2, "softmax", name="o"),
        ],
        (5, 5, 2),
        lambda: OPT.Adam(0.01),
    ),
]


def _assert_close(got, ref, what: str) -> None:
    scale = max(1.0, float(np.max(np.abs(ref))))  # the penalty can make the loss large
    diff = max_abs_diff(got, ref)
    assert diff <= TOLERANCE * scale, f"{what} differs from Keras by {diff:.3g}: {got} vs {ref}"


def _parity(model: keras.Model) -> None:
    runtime = convert(model, BATCH)
    batches = random_batches(runtime.manifest, STEPS, seed=3)
    got_losses, got_weights = litert_steps(runtime, batches)
    ref_losses, ref_weights = keras_train_on_batch(model, batches)
    _assert_close(got_losses, ref_losses, "the loss")
    for name, array in got_weights.items():
        _assert_close(array, ref_weights[name], name)
    assert roundtrip_is_exact(runtime)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_regularized_steps_match_keras_train_on_batch(case: Case):
    model = compiled(case.layers(), case.input_shape, SCE, case.optimizer(), seed=5, name=case.id)
    penalty = float(sum(keras.ops.convert_to_numpy(v) for v in model.losses))
    assert penalty > 1e-3 or case.id == "dense_l1_bias_adam"  # Keras really adds a penalty (biases start at 0)
    _parity(model)


def test_frozen_regularized_layer_adds_no_penalty_as_in_keras():
    layers = [
        L.Dense(6, "tanh", name="low"),
        L.Dense(5, "tanh", kernel_regularizer=R.L2(1.0), name="frozen", trainable=False),
        L.Dense(3, "softmax", kernel_regularizer=R.L2(0.05), name="o"),
    ]
    model = compiled(layers, (4,), SCE, OPT.SGD(0.1), seed=2, name="frozen_middle")
    assert len(model.losses) == 1  # only the trainable layer's penalty
    assert regularizer_of(model.get_layer("frozen"), "kernel") is None
    _parity(model)


def test_regularizer_of_reads_keras_coefficients():
    layer = L.Dense(3, kernel_regularizer="l1", bias_regularizer=R.L1L2(0.5, 0.25))
    layer.build((None, 2))
    assert regularizer_of(layer, "kernel") == (pytest.approx(0.01), 0.0)
    assert regularizer_of(layer, "bias") == (0.5, 0.25)
    assert regularizer_of(L.Dense(3, kernel_regularizer=R.L1L2(0.0, 0.0)), "kernel") is None


class _Scaled(R.L2):
    def __call__(self, x):
        return 3.0 * super().__call__(x)


@pytest.mark.parametrize(
    "layer, match",
    [
        (lambda: L.Dense(4, activity_regularizer="l2", name="bad"), "activity_regularizer"),
        (lambda: L.Dense(4, kernel_regularizer=R.OrthogonalRegularizer(), name="bad"), "OrthogonalRegularizer"),
        (lambda: L.Dense(4, bias_regularizer=_Scaled(0.1), name="bad"), "_Scaled"),
        (lambda: L.Dense(4, activity_regularizer="l1", trainable=False, name="bad"), "activity_regularizer"),
    ],
    ids=["activity", "orthogonal", "subclass", "activity_on_frozen"],
)
def test_unsupported_regularizers_are_refused(layer, match):
    model = compiled([L.Dense(4, name="low"), layer(), L.Dense(2, "softmax")], (3,), SCE, OPT.SGD(0.1))
    with pytest.raises(UnsupportedModelError, match=match) as info:
        convert_model(model, ConvertConfig(batch_size=2, verify=False))
    assert "'bad'" in str(info.value) and "remove it" in str(info.value)
