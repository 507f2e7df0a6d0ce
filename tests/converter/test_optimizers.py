"""RMSprop, Adagrad, AdamW, weight decay and gradient clipping step exactly as Keras' do.

Each case compiles a small model with a Keras optimizer, converts it (the
converter reads the compiled optimizer, or takes it from flags), and runs
the same batches through LiteRT's ``train`` and Keras' ``train_on_batch``.
Sample weights are all 1 here, so the comparison does not depend on the
loss reduction (``test_sample_weight.py`` covers that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import keras
import numpy as np
import pytest

from converter import ConvertConfig, UnsupportedModelError, convert_model
from converter.optimizers import OptimizerConfig
from converter.reference import Batch, named_weights
from edge_client.model_file import require_builtin_only
from edge_client.runtime import TrainableModel
from tests.converter.keras_steps import L, compiled, convert, keras_train_on_batch, litert_steps, roundtrip_is_exact
from tests.helpers import max_abs_diff

BATCH = 4
STEPS = 5
TOLERANCE = 1e-5
OPT = keras.optimizers


@dataclass(frozen=True)
class Case:
    id: str
    optimizer: keras.optimizers.Optimizer
    flags: dict = field(default_factory=dict)  # ConvertConfig settings instead of reading the compiled optimizer
    slots: tuple[str, ...] = ()
    # The clipping or decay really acts: without it Keras ends elsewhere (the case would prove nothing).
    differs_from: keras.optimizers.Optimizer | None = None


CASES = [
    Case("rmsprop", OPT.RMSprop(0.01), slots=("velocity",)),
    Case("rmsprop_momentum", OPT.RMSprop(0.01, rho=0.8, momentum=0.5), slots=("velocity", "momentum")),
    Case(
        "rmsprop_centered_momentum",
        OPT.RMSprop(0.005, momentum=0.3, centered=True),
        slots=("velocity", "average_gradient", "momentum"),
    ),
    Case("adagrad", OPT.Adagrad(0.1), slots=("squared_gradient_sum",)),
    Case(
        "adagrad_no_initial",
        OPT.Adagrad(0.05, initial_accumulator_value=0.0, epsilon=1e-3),
        slots=("squared_gradient_sum",),
    ),
    Case("adamw", OPT.AdamW(0.02, weight_decay=0.5), slots=("m", "v"), differs_from=OPT.Adam(0.02)),
    Case(
        "sgd_weight_decay",
        OPT.SGD(0.2, momentum=0.5, weight_decay=0.3),
        slots=("momentum",),
        differs_from=OPT.SGD(0.2, momentum=0.5),
    ),
    Case("adam_clipnorm", OPT.Adam(0.05, clipnorm=0.05), slots=("m", "v"), differs_from=OPT.Adam(0.05)),
    Case("sgd_global_clipnorm", OPT.SGD(0.5, global_clipnorm=0.1), differs_from=OPT.SGD(0.5)),
    Case("sgd_clipvalue", OPT.SGD(0.5, clipvalue=0.02), differs_from=OPT.SGD(0.5)),
    Case("rmsprop_clipnorm", OPT.RMSprop(0.01, momentum=0.5, clipnorm=0.05), slots=("velocity", "momentum")),
    # From flags: Keras' defaults for what the flags leave out (AdamW's weight decay 0.004, RMSprop's rho 0.9).
    Case("adamw_via_flags", OPT.AdamW(0.01), flags={"optimizer": "adamw", "learning_rate": 0.01}, slots=("m", "v")),
    Case(
        "rmsprop_via_flags_clipvalue",
        OPT.RMSprop(0.01, clipvalue=0.01),
        flags={"optimizer": "rmsprop", "learning_rate": 0.01, "clipvalue": 0.01},
        slots=("velocity",),
    ),
    Case(
        "adagrad_via_flags_global_clipnorm",
        OPT.Adagrad(0.1, global_clipnorm=0.2),
        flags={"optimizer": "adagrad", "learning_rate": 0.1, "global_clipnorm": 0.2},
        slots=("squared_gradient_sum",),
    ),
]


def _model(optimizer: keras.optimizers.Optimizer, name: str) -> keras.Model:
    layers = [
        L.Conv2D(3, 2, padding="same", activation="relu", name="stem"),
        L.MaxPooling2D(2, name="pool"),
        L.Flatten(name="flatten"),
        L.Dense(6, activation="tanh", name="hidden"),
        L.Dense(3, activation="softmax", name="out"),
    ]
    return compiled(layers, (6, 6, 2), "sparse_categorical_crossentropy", optimizer, seed=7, name=name)


def _batches(seed: int = 1) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [
        Batch(
            rng.uniform(0.0, 1.0, (BATCH, 6, 6, 2)).astype(np.float32),
            rng.integers(0, 3, BATCH).astype(np.int32),
            np.ones(BATCH, np.float32),
        )
        for _ in range(STEPS)
    ]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_steps_match_keras_train_on_batch(case: Case):
    flagged = bool(case.flags)
    model = _model(OPT.SGD(0.01) if flagged else case.optimizer, case.id)  # flags must replace what is compiled
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=False, **case.flags))
    require_builtin_only(converted.tflite)
    runtime = TrainableModel(converted.tflite, converted.manifest)
    state = [s.name for s in runtime.manifest.optimizer_state]
    expected_slots = [f"optimizer/{s}/{w.name}" for w in runtime.manifest.weights for s in case.slots]
    assert [n for n in state if n != "optimizer/iterations"] == expected_slots

    batches = _batches()
    got_losses, got_weights = litert_steps(runtime, batches)
    ref_losses, ref_weights = keras_train_on_batch(model, batches, case.optimizer)
    assert max_abs_diff(got_losses, ref_losses) <= TOLERANCE, (got_losses, ref_losses)
    for name, array in got_weights.items():
        diff = max_abs_diff(array, ref_weights[name])
        assert diff <= TOLERANCE, f"{name} differs from Keras by {diff:.3g} after {STEPS} steps"

    moved = max(max_abs_diff(got_weights[n], a) for n, a in named_weights(model).items())
    assert moved > 1e-3, f"training barely moved the weights ({moved:.3g})"
    if case.differs_from is not None:
        _, plain = keras_train_on_batch(model, batches, case.differs_from)
        effect = max(max_abs_diff(plain[n], ref_weights[n]) for n in plain)
        assert effect > 1e-4, f"the option changed the weights by only {effect:.3g}"
    assert roundtrip_is_exact(runtime)


def test_adagrad_state_zero_means_keras_initial_accumulator():
    """The round-start reset (optimizer state = 0) is a fresh Keras Adagrad, initial value included."""
    case = next(c for c in CASES if c.id == "adagrad")
    model = _model(case.optimizer, "adagrad_reset")
    runtime = convert(model, BATCH)
    batches = _batches(seed=4)
    litert_steps(runtime, batches[:2])
    runtime.set_weights(runtime.get_weights())  # trainable tensors only: the state restarts at 0
    start = {w.name: w.array for w in runtime.get_weights()}
    got_losses, got_weights = litert_steps(runtime, batches[2:])

    model.set_weights([start[f"{layer.name}/{v.name}"] for layer in model.layers for v in layer.weights])
    ref_losses, ref_weights = keras_train_on_batch(model, batches[2:])
    assert max_abs_diff(got_losses, ref_losses) <= TOLERANCE
    for name, array in got_weights.items():
        assert max_abs_diff(array, ref_weights[name]) <= TOLERANCE, name


@pytest.mark.parametrize("config", [OptimizerConfig("adam"), OptimizerConfig("rmsprop", clipnorm=1.0)])
def test_to_keras_builds_the_same_optimizer(config: OptimizerConfig):
    keras_opt = config.to_keras()
    cfg = keras_opt.get_config()
    assert type(keras_opt).__name__.lower() == config.name
    assert cfg["clipnorm"] == config.clipnorm and cfg["learning_rate"] == pytest.approx(config.learning_rate)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "adagrad", "initial_accumulator_value": -1.0}, "initial_accumulator_value"),
        ({"name": "rmsprop", "rho": 1.0}, "rho"),
        ({"weight_decay": -0.1}, "weight decay"),
        ({"clipnorm": 0.0}, "clipping"),
        ({"clipnorm": 1.0, "global_clipnorm": 1.0}, "at most one"),
    ],
)
def test_invalid_hyper_parameters_are_refused(kwargs, match):
    with pytest.raises(UnsupportedModelError, match=match):
        OptimizerConfig(**kwargs)
