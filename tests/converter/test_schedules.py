"""Compiled learning-rate schedules step as Keras' do, computed in the graph from ``optimizer/iterations``.

Every case decays fast (a couple of steps per decay) so that over 5 steps the
schedule changes the rate noticeably: a Keras run at the constant base rate
ends elsewhere. The fed ``lr`` scales the schedule (a coordinator's rate).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import pytest

from converter import ConvertConfig, UnsupportedModelError, convert_model
from converter.api import resolve_optimizer
from converter.optimizers import OptimizerConfig, Schedule
from converter.verify import random_batches
from edge_client.runtime import TrainableModel
from tests.converter.keras_steps import L, compiled, convert, keras_train_on_batch, litert_steps, roundtrip_is_exact
from tests.helpers import max_abs_diff

BATCH = 4
STEPS = 5
TOLERANCE = 1e-5
OPT = keras.optimizers
S = keras.optimizers.schedules
SCE = "sparse_categorical_crossentropy"


@dataclass(frozen=True)
class Case:
    id: str
    optimizer: object  # () -> a Keras optimizer with a schedule


CASES = [
    Case("exponential_sgd", lambda: OPT.SGD(S.ExponentialDecay(0.5, decay_steps=2, decay_rate=0.3))),
    Case(
        "exponential_staircase_momentum",
        lambda: OPT.SGD(S.ExponentialDecay(0.5, 2, 0.3, staircase=True), momentum=0.5),
    ),
    Case("cosine_alpha_adam", lambda: OPT.Adam(S.CosineDecay(0.05, decay_steps=3, alpha=0.1))),
    Case(
        "cosine_warmup_sgd",
        lambda: OPT.SGD(S.CosineDecay(0.0, decay_steps=2, alpha=0.2, warmup_target=0.5, warmup_steps=2)),
    ),
    Case("piecewise_adam", lambda: OPT.Adam(S.PiecewiseConstantDecay([1, 3], [0.05, 0.01, 0.002]))),
    Case("inverse_time_staircase_adamw", lambda: OPT.AdamW(S.InverseTimeDecay(0.05, 2, 2.0, staircase=True), 0.3)),
    Case("polynomial_cycle_rmsprop", lambda: OPT.RMSprop(S.PolynomialDecay(0.02, 2, 0.001, power=2.0, cycle=True))),
]


def _model(optimizer, name: str) -> keras.Model:
    layers = [L.Dense(6, "tanh", name="h"), L.Dense(3, "softmax", name="o")]
    return compiled(layers, (5,), SCE, optimizer, seed=3, name=name)


def _constant(optimizer) -> keras.optimizers.Optimizer:
    """``optimizer`` with its schedule replaced by the schedule's base rate."""
    cfg = optimizer.get_config()
    base = Schedule.from_keras(cfg["learning_rate"]).base_rate
    return type(optimizer).from_config({**cfg, "learning_rate": base})


def _assert_same(got: tuple, ref: tuple) -> None:
    assert max_abs_diff(got[0], ref[0]) <= TOLERANCE, (got[0], ref[0])
    for name, array in got[1].items():
        diff = max_abs_diff(array, ref[1][name])
        assert diff <= TOLERANCE, f"{name} differs from Keras by {diff:.3g} after {STEPS} steps"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_scheduled_steps_match_keras_train_on_batch(case: Case):
    model = _model(case.optimizer(), case.id)
    runtime = convert(model, BATCH)
    assert runtime.manifest.optimizer_state[0].name == "optimizer/iterations"
    batches = random_batches(runtime.manifest, STEPS, seed=1)
    got = litert_steps(runtime, batches)
    ref = keras_train_on_batch(model, batches)
    _assert_same(got, ref)
    (iterations,) = [a for n, a in runtime.get_weights(include_optimizer=True) if n == "optimizer/iterations"]
    assert float(iterations[0]) == STEPS
    _, plain = keras_train_on_batch(model, batches, _constant(model.optimizer))
    effect = max(max_abs_diff(plain[n], ref[1][n]) for n in plain)
    assert effect > 1e-3, f"the schedule changed the weights by only {effect:.3g}"


@pytest.fixture(scope="module")
def exponential():
    """One verified conversion (the converter's own check runs Keras' schedule too)."""
    model = _model(OPT.SGD(S.ExponentialDecay(0.4, 2, 0.3), momentum=0.2), "exponential")
    converted = convert_model(model, ConvertConfig(batch_size=BATCH, verify=True, verify_steps=STEPS))
    assert converted.report is not None and converted.report.worst <= 1e-5
    return model, converted


def test_manifest_records_the_schedule(exponential):
    _, converted = exponential
    assert converted.manifest.optimizer == {
        "name": "sgd",
        "learning_rate": 0.4,
        "momentum": 0.2,
        "nesterov": False,
        "learning_rate_schedule": {
            "class_name": "ExponentialDecay",
            "initial_learning_rate": 0.4,
            "decay_steps": 2,
            "decay_rate": 0.3,
            "staircase": False,
        },
    }


def test_fed_rate_scales_the_schedule(exponential):
    model, converted = exponential
    runtime = TrainableModel(converted.tflite, converted.manifest)
    batches = random_batches(runtime.manifest, STEPS, seed=2)
    got_losses = [runtime.train_step(b.x, b.y, b.sample_weight, lr=0.1).loss for b in batches]
    got_weights = {w.name: w.array for w in runtime.get_weights()}
    config = resolve_optimizer(model, ConvertConfig(batch_size=BATCH))
    ref = keras_train_on_batch(model, batches, config.to_keras(0.1))  # ExponentialDecay(0.1, 2, 0.3)
    _assert_same((got_losses, got_weights), ref)


def test_a_round_restarts_the_schedule(exponential):
    """``set_weights`` with the federated tensors only zeroes iterations: each round starts at step 0."""
    model, converted = exponential
    runtime = TrainableModel(converted.tflite, converted.manifest)
    batches = random_batches(runtime.manifest, 2 * STEPS, seed=4)
    litert_steps(runtime, batches[:STEPS])
    runtime.set_weights(runtime.get_weights())
    assert roundtrip_is_exact(runtime)
    start = {w.name: w.array for w in runtime.get_weights()}
    got = litert_steps(runtime, batches[STEPS:])
    restarted = keras.models.clone_model(model)
    restarted.set_weights([start[f"{layer.name}/{v.name}"] for layer in model.layers for v in layer.weights])
    restarted.compile(loss=model.loss, optimizer=model.optimizer.from_config(model.optimizer.get_config()))
    _assert_same(got, keras_train_on_batch(restarted, batches[STEPS:]))


def test_learning_rate_flag_replaces_the_schedule():
    model = _model(OPT.Adam(S.CosineDecay(0.05, 3)), "flagged")
    assert resolve_optimizer(model, ConvertConfig(batch_size=BATCH, learning_rate=0.01)) == OptimizerConfig(
        "adam", 0.01
    )
    read = resolve_optimizer(model, ConvertConfig(batch_size=BATCH))
    assert read.schedule is not None and read.schedule.kind == "CosineDecay" and read.learning_rate == 0.05


class _Halved(S.ExponentialDecay):
    def __call__(self, step):
        return 0.5 * super().__call__(step)


@pytest.mark.parametrize(
    "schedule, match",
    [
        (lambda: S.CosineDecayRestarts(0.1, 3), "CosineDecayRestarts"),
        (lambda: _Halved(0.1, 2, 0.5), "_Halved"),
        (lambda: S.PiecewiseConstantDecay([2], [0.0, 0.1]), "base learning rate"),
    ],
    ids=["restarts", "subclass", "zero_base"],
)
def test_unsupported_schedules_are_refused_with_the_fix(schedule, match):
    model = _model(OPT.SGD(schedule()), "refused")
    with pytest.raises(UnsupportedModelError, match=match) as info:
        resolve_optimizer(model, ConvertConfig(batch_size=BATCH))
    assert "--learning-rate" in str(info.value)


def test_schedule_rates_match_keras_at_every_step():
    """The graph's formula per schedule and step (no conversion: plain TensorFlow, far steps included)."""
    import tensorflow as tf

    schedules = [
        S.ExponentialDecay(0.3, 3, 0.7, staircase=True),
        S.InverseTimeDecay(0.3, 2, 0.5),
        S.PolynomialDecay(0.3, 4, 0.01, power=0.5),
        S.PolynomialDecay(0.3, 3, 0.05, cycle=True),
        S.CosineDecay(0.2, 5, alpha=0.3),
        S.CosineDecay(0.1, 4, warmup_target=0.3, warmup_steps=3),
        S.PiecewiseConstantDecay([2, 5, 7], [0.3, 0.2, 0.1, 0.05]),
    ]
    for keras_schedule in schedules:
        ours = Schedule.from_keras(keras.optimizers.SGD(keras_schedule).get_config()["learning_rate"])
        for step in range(12):
            want = float(keras_schedule(step))
            got = float(ours.rate(tf.constant(float(step))))
            assert abs(got - want) <= 1e-6 * max(1.0, want), (type(keras_schedule).__name__, step, got, want)
        rebuilt = ours.to_keras(2.0)
        assert float(rebuilt(3)) == pytest.approx(2.0 * float(keras_schedule(3)), rel=1e-6)
