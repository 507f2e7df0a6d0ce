"""A flag replaces what the model was compiled with, and every refusal's suggested fix converts.

Each refusal names the flag that fixes it (``pass --optimizer adam ...``);
the tests read that suggestion back out of the message, apply it as a
:class:`ConvertConfig` setting, and check that the conversion then succeeds.
"""

from __future__ import annotations

import re

import keras
import pytest

from converter import ConvertConfig, UnsupportedModelError, convert_model
from converter.api import resolve_loss, resolve_optimizer
from converter.cli import main
from edge_client.manifest import load_manifest

L = keras.layers
PLACEHOLDERS = {"LR": "0.05"}  # what a user would type for a placeholder in a message


def _model(loss=None, optimizer=None) -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="softmax")])
    if loss is not None:
        model.compile(loss=loss, optimizer=optimizer or "sgd")
    return model


def suggested_config(message: str) -> ConvertConfig:
    """The ConvertConfig a user gets by following the ``pass --flag VALUE`` in ``message``."""
    found = re.findall(r"--([a-z-]+) ([^\s;,]+)", message)
    assert found, f"the message suggests no flag: {message}"
    settings: dict = {}
    for flag, value in found:
        value = PLACEHOLDERS.get(value, value).split("|")[0]  # the first of the alternatives
        settings[flag.replace("-", "_")] = float(value) if flag == "learning-rate" else value
    return ConvertConfig(batch_size=2, verify=False, **settings)


SCHEDULE = keras.optimizers.schedules.CosineDecayRestarts(0.1, 10)  # a schedule litefed refuses
REFUSED = {
    "uncompiled": lambda: _model(),
    "unknown_compiled_optimizer": lambda: _model("sparse_categorical_crossentropy", keras.optimizers.Nadam()),
    "amsgrad": lambda: _model("sparse_categorical_crossentropy", keras.optimizers.Adam(amsgrad=True)),
    "use_ema": lambda: _model("sparse_categorical_crossentropy", keras.optimizers.SGD(use_ema=True)),
    "accumulation": lambda: _model(
        "sparse_categorical_crossentropy", keras.optimizers.RMSprop(gradient_accumulation_steps=2)
    ),
    "schedule": lambda: _model("sparse_categorical_crossentropy", keras.optimizers.SGD(SCHEDULE, momentum=0.5)),
    "ignore_class": lambda: _model(keras.losses.SparseCategoricalCrossentropy(ignore_class=0)),
    "unknown_compiled_loss": lambda: _model(keras.losses.CategoricalHinge()),
}


@pytest.mark.parametrize("build", REFUSED.values(), ids=REFUSED.keys())
def test_the_fix_a_refusal_suggests_converts(build):
    model = build()
    with pytest.raises(UnsupportedModelError) as info:
        convert_model(model, ConvertConfig(batch_size=2, verify=False))
    message = str(info.value)
    assert "\n" not in message
    converted = convert_model(model, suggested_config(message))
    assert converted.manifest.batch_size == 2


def test_schedule_fix_keeps_the_rest_of_the_compiled_optimizer():
    model = REFUSED["schedule"]()
    opt = resolve_optimizer(model, ConvertConfig(batch_size=2, learning_rate=0.05))
    assert (opt.name, opt.learning_rate, opt.momentum) == ("sgd", 0.05, 0.5)


def test_optimizer_flag_replaces_the_compiled_optimizer_with_keras_defaults():
    model = _model("sparse_categorical_crossentropy", keras.optimizers.SGD(0.3, momentum=0.9, clipnorm=1.0))
    opt = resolve_optimizer(model, ConvertConfig(batch_size=2, optimizer="rmsprop"))
    assert opt.to_json() == keras_defaults_json("rmsprop")
    opt = resolve_optimizer(model, ConvertConfig(batch_size=2, optimizer="sgd"))
    assert opt.to_json() == {"name": "sgd", "learning_rate": 0.01, "momentum": 0.0, "nesterov": False}


def keras_defaults_json(name: str) -> dict:
    return {"name": name, "learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False}


def test_single_flags_override_their_compiled_setting_only():
    model = _model("sparse_categorical_crossentropy", keras.optimizers.Adam(0.02, beta_1=0.8, clipnorm=2.0))
    config = ConvertConfig(batch_size=2, learning_rate=0.005, clipvalue=0.5, weight_decay=0.01)
    assert resolve_optimizer(model, config).to_json() == {
        "name": "adam",
        "learning_rate": 0.005,
        "beta_1": 0.8,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "weight_decay": 0.01,
        "clipvalue": 0.5,  # replaces the compiled clipnorm: Keras allows only one kind
    }


def test_compiled_optimizers_are_read_with_their_settings():
    model = _model("sparse_categorical_crossentropy", keras.optimizers.AdamW(0.01, weight_decay=0.1))
    assert resolve_optimizer(model, ConvertConfig(batch_size=2)).to_json() == {
        "name": "adamw",
        "learning_rate": 0.01,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "weight_decay": 0.1,
    }
    model = _model("sparse_categorical_crossentropy", keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.5))
    assert resolve_optimizer(model, ConvertConfig(batch_size=2)).to_json() == {
        "name": "adagrad",
        "learning_rate": 0.1,
        "initial_accumulator_value": 0.5,
        "epsilon": 1e-7,
    }


def test_loss_flag_replaces_the_compiled_loss_but_keeps_from_logits():
    model = _model(keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=1))
    assert resolve_loss(model, ConvertConfig(batch_size=2, loss="sce")) == ("sparse_categorical_crossentropy", True)
    config = ConvertConfig(batch_size=2, loss="sce", from_logits=False)
    assert resolve_loss(model, config) == ("sparse_categorical_crossentropy", False)


def test_two_clipping_settings_are_refused():
    with pytest.raises(UnsupportedModelError, match="at most one"):
        resolve_optimizer(_model(), ConvertConfig(batch_size=2, clipnorm=1.0, clipvalue=1.0))


def test_cli_flag_fixes_a_refused_keras_file(tmp_path, capsys):
    saved = tmp_path / "clf.keras"
    _model("sparse_categorical_crossentropy", keras.optimizers.Nadam()).save(saved)
    out = tmp_path / "clf.tflite"
    base = [str(saved), "-o", str(out), "--batch-size", "2", "--no-verify", "--quiet"]
    assert main(base) == 1
    assert "pass --optimizer" in capsys.readouterr().err
    assert main([*base, "--optimizer", "rmsprop", "--learning-rate", "0.01", "--global-clipnorm", "1"]) == 0
    manifest = load_manifest(out.with_suffix(".json"))
    assert manifest.optimizer["name"] == "rmsprop" and manifest.optimizer["global_clipnorm"] == 1.0


def test_a_loss_option_the_loss_does_not_take_is_refused_with_a_fix_that_converts():
    model = _model("sparse_categorical_crossentropy")
    config = ConvertConfig(batch_size=2, verify=False, huber_delta=0.5)  # delta is Huber's only
    with pytest.raises(UnsupportedModelError, match="delta=0.5 is not supported for sparse_categorical_crossentropy; "
                       "leave out --huber-delta, or pass --loss huber"):  # fmt: skip
        convert_model(model, config)
    convert_model(model, ConvertConfig(batch_size=2, verify=False))  # the delta left out
    convert_model(model, ConvertConfig(batch_size=2, verify=False, huber_delta=0.5, loss="huber"))
