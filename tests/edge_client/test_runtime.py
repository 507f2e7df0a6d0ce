"""The LiteRT runtime: batching, fit/evaluate/predict, and input validation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.errors import ManifestError, ModelFileError, WeightsError
from edge_client.manifest import FORMAT_VERSION, Manifest, load_manifest
from edge_client.model_file import summarize_operators
from edge_client.runtime import TrainableModel, padded_batches
from tests.helpers import separable_binary_data

# -- padded_batches -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(num_examples=st.integers(0, 50), batch_size=st.integers(1, 9), shuffle_seed=st.none() | st.integers(0, 1000))
def test_padded_batches_cover_every_index_once(num_examples, batch_size, shuffle_seed):
    order = None if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(num_examples)
    batches = list(padded_batches(num_examples, batch_size, order))
    assert len(batches) == -(-num_examples // batch_size)
    real_indices = []
    for i, (idx, real) in enumerate(batches):
        assert len(idx) == batch_size
        is_last = i == len(batches) - 1
        expected_real = num_examples - i * batch_size if is_last else batch_size
        assert real == expected_real
        assert 1 <= real <= batch_size
        assert np.all((idx >= 0) & (idx < num_examples))  # padding repeats real indices
        real_indices.extend(idx[:real].tolist())
    assert sorted(real_indices) == list(range(num_examples))
    if order is not None:
        assert real_indices == order.tolist()


def test_padded_batches_example():
    batches = [(idx.tolist(), real) for idx, real in padded_batches(10, 4)]
    assert [real for _, real in batches] == [4, 4, 2]
    assert batches[0][0] == [0, 1, 2, 3] and batches[1][0] == [4, 5, 6, 7]
    assert batches[2][0][:2] == [8, 9]


# -- fit / evaluate / predict -------------------------------------------------------


def _multiclass_data(n: int, manifest, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, *manifest.input.shape[1:])).astype(np.float32)
    y = rng.integers(0, manifest.num_classes, n).astype(np.int32)
    return x, y


def _state(model) -> dict[str, np.ndarray]:
    return {n: a.copy() for n, a in model.get_weights(include_optimizer=True)}


def test_fit_pads_the_last_batch_with_zero_weights(small_cnn):
    """5 examples, batch 4 == a full step, then a step with weights [1, 0, 0, 0]."""
    assert small_cnn.manifest.batch_size == 4
    x, y = _multiclass_data(5, small_cnn.manifest)

    fitted = small_cnn.runtime()
    metrics = fitted.fit(x, y, epochs=1, lr=0.05)

    manual = small_cnn.runtime()
    first = manual.train_step(x[:4], y[:4], np.ones(4, np.float32), lr=0.05)
    # The padding rows hold arbitrary data: with weight 0 they must not matter.
    garbage_x, garbage_y = _multiclass_data(3, small_cnn.manifest, seed=99)
    second = manual.train_step(
        np.concatenate([x[4:], garbage_x]),
        np.concatenate([y[4:], garbage_y]),
        np.array([1, 0, 0, 0], np.float32),
        lr=0.05,
    )

    got, expected = _state(fitted), _state(manual)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)
    assert metrics.num_examples == 5
    assert metrics.loss == pytest.approx((4 * first.loss + second.loss) / 5, abs=1e-6)
    assert metrics.accuracy == pytest.approx((first.correct + second.correct) / 5, abs=1e-6)
    # And the step really moved the weights.
    assert any(not np.array_equal(got[n], a) for n, a in _state(small_cnn.runtime()).items())


def test_zero_weight_batch_changes_nothing(small_cnn):
    model = small_cnn.runtime()
    before = _state(model)
    x, y = _multiclass_data(4, small_cnn.manifest)
    result = model.train_step(x, y, np.zeros(4, np.float32), lr=0.5)
    assert result.loss == 0.0 and result.correct == 0.0
    after = _state(model)
    for name in before:
        assert np.array_equal(before[name], after[name]), name


def _softmax_cross_entropy(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(probs[np.arange(len(y)), y].astype(np.float64), 1e-7, 1 - 1e-7)
    return -np.log(p)


def test_evaluate_matches_numpy_on_predictions_multiclass(small_cnn):
    model = small_cnn.runtime()
    x, y = _multiclass_data(10, small_cnn.manifest, seed=1)  # 10 = 4 + 4 + 2 (padded)
    model.fit(x, y, epochs=2, lr=0.2)  # move away from the initial weights first
    probs = model.predict(x)
    assert probs.shape == (10, small_cnn.manifest.num_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    metrics = model.evaluate(x, y)
    assert metrics.num_examples == 10
    assert metrics.loss == pytest.approx(float(np.mean(_softmax_cross_entropy(probs, y))), abs=1e-5)
    assert metrics.accuracy == pytest.approx(float(np.mean(probs.argmax(axis=1) == y)), abs=1e-9)


def test_evaluate_matches_numpy_on_predictions_binary(tabular):
    model = tabular.runtime()
    x, y = separable_binary_data(37, num_features=8, seed=2)
    model.fit(x[:16], y[:16], epochs=1)
    p = model.predict(x).astype(np.float64)
    assert p.shape == (37, 1)
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    bce = -(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)).mean(axis=1)

    metrics = model.evaluate(x, y)
    assert metrics.num_examples == 37
    assert metrics.loss == pytest.approx(float(bce.mean()), abs=1e-5)
    assert metrics.accuracy == pytest.approx(float(np.mean((p > 0.5) == (y > 0.5))), abs=1e-9)


@pytest.mark.parametrize("n", [1, 4, 7, 9])
def test_predict_any_number_of_examples_equals_infer_batch(small_cnn, n):
    model = small_cnn.runtime()
    x, _ = _multiclass_data(12, small_cnn.manifest, seed=3)
    full = np.concatenate([model.infer_batch(x[i : i + 4]) for i in range(0, 12, 4)])
    got = model.predict(x[:n])
    assert got.shape == (n, 3)
    np.testing.assert_allclose(got, full[:n], rtol=0, atol=1e-6)


def test_infer_and_evaluate_do_not_train(small_cnn):
    model = small_cnn.runtime()
    before = _state(model)
    x, y = _multiclass_data(8, small_cnn.manifest)
    model.predict(x)
    model.evaluate(x, y)
    after = _state(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_load_reads_model_and_manifest_from_disk(small_cnn):
    model = TrainableModel.load(small_cnn.model_path)
    assert model.manifest == small_cnn.manifest
    assert model.batch_size == 4


# -- refusing bad inputs --------------------------------------------------------------


def test_manifest_of_another_model_is_refused(small_cnn, tabular):
    with pytest.raises(ManifestError, match="sha256"):
        TrainableModel(small_cnn.tflite, tabular.manifest)
    tampered = dataclasses.replace(small_cnn.manifest, model_sha256="0" * 64)
    with pytest.raises(ManifestError, match="sha256"):
        TrainableModel(small_cnn.tflite, tampered)


def test_modified_model_bytes_are_refused(small_cnn):
    data = bytearray(small_cnn.tflite)
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(ManifestError):
        TrainableModel(bytes(data), small_cnn.manifest)


def _manifest_json(converted) -> dict:
    return json.loads(converted.manifest_path.read_text())


def test_manifest_json_round_trips(small_cnn):
    obj = _manifest_json(small_cnn)
    assert Manifest.from_json(obj) == small_cnn.manifest
    assert Manifest.from_json(small_cnn.manifest.to_json()) == small_cnn.manifest


REQUIRED_KEYS = [
    "model_name",
    "task",
    "batch_size",
    "input",
    "label",
    "output",
    "num_classes",
    "loss",
    "optimizer",
    "weights",
    "optimizer_state",
    "signatures",
    "model_sha256",
    "converter_version",
    "format",
    "format_version",
]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_manifest_missing_key_is_refused(small_cnn, key):
    obj = _manifest_json(small_cnn)
    del obj[key]
    with pytest.raises(ManifestError):
        Manifest.from_json(obj)


def _mutate(obj: dict, how: str) -> object:
    if how == "not_a_dict":
        return [obj]
    if how == "wrong_format":
        obj["format"] = "something-else"
    elif how == "format_version_1":
        obj["format_version"] = 1
    elif how == "format_version_3":
        obj["format_version"] = 3
    elif how == "format_version_string":
        obj["format_version"] = "2"
    elif how == "rank0_state":
        obj["optimizer_state"][0]["shape"] = []
    elif how == "duplicate_weight_names":
        obj["weights"][1]["name"] = obj["weights"][0]["name"]
    elif how == "state_name_duplicates_weight":
        obj["optimizer_state"][0]["name"] = obj["weights"][0]["name"]
    elif how == "unknown_task":
        obj["task"] = "ranking"
    elif how == "batch_mismatch":
        obj["batch_size"] = obj["batch_size"] + 1
    elif how == "zero_batch":
        obj["batch_size"] = 0
        obj["input"]["shape"][0] = 0
    elif how == "missing_signature":
        del obj["signatures"]["set_weights"]
    elif how == "negative_dim":
        obj["weights"][0]["shape"][0] = -1
    elif how == "unknown_dtype":
        obj["weights"][0]["dtype"] = "float99"
    elif how == "tensor_without_name":
        del obj["input"]["name"]
    elif how == "weights_not_a_list":
        obj["weights"] = 7
    else:
        raise AssertionError(how)
    return obj


MALFORMED = [
    "not_a_dict",
    "wrong_format",
    "format_version_1",
    "format_version_3",
    "format_version_string",
    "rank0_state",
    "duplicate_weight_names",
    "state_name_duplicates_weight",
    "unknown_task",
    "batch_mismatch",
    "zero_batch",
    "missing_signature",
    "negative_dim",
    "unknown_dtype",
    "tensor_without_name",
    "weights_not_a_list",
]


@pytest.mark.parametrize("how", MALFORMED)
def test_malformed_manifest_is_refused(small_cnn, how):
    assert small_cnn.manifest.optimizer_state, "needs optimizer state (SGD momentum)"
    with pytest.raises(ManifestError):
        Manifest.from_json(_mutate(_manifest_json(small_cnn), how))


def test_manifest_of_an_old_format_says_to_reconvert(small_cnn):
    obj = _manifest_json(small_cnn)
    assert obj["format_version"] == FORMAT_VERSION == 2
    obj["format_version"] = 1
    with pytest.raises(ManifestError, match="re-convert the model with the current litefed-convert"):
        Manifest.from_json(obj)


def test_model_with_rank0_signature_inputs_is_refused_not_run(tmp_path):
    """A pre-fix graph (rank-0 lr, mu) under a current manifest: refused at load, whatever the machine."""
    from tests.arm64.legacy import convert_legacy, save_legacy
    from tests.helpers import build_small_cnn

    tflite, manifest = convert_legacy(build_small_cnn(seed=5, name="legacy_cnn"), batch_size=4)
    with pytest.raises(ManifestError, match=r"rank-0 inputs \['lr', 'mu'\].*re-convert the model"):
        TrainableModel(tflite, manifest)
    path = save_legacy(tflite, manifest, tmp_path / "legacy.tflite")
    with pytest.raises(ManifestError, match="re-convert"):
        TrainableModel.load(path)
    old = save_legacy(tflite, manifest, tmp_path / "old.tflite", format_version=1)
    with pytest.raises(ManifestError, match="format_version 1 .*re-convert"):
        TrainableModel.load(old)


def test_inputs_of_the_wrong_shape_are_refused(small_cnn):
    model = small_cnn.runtime()
    x, y = _multiclass_data(4, small_cnn.manifest)
    with pytest.raises(WeightsError, match="shape"):
        model.infer_batch(x[:3])
    with pytest.raises(WeightsError, match="shape"):
        model.train_step(x, y[:2])
    model.train_step(x, y)  # still usable afterwards


def test_results_are_copies_that_survive_later_calls(small_cnn):
    model = small_cnn.runtime()
    x, y = _multiclass_data(8, small_cnn.manifest, seed=4)
    first = model.infer_batch(x[:4])
    kept = first.copy()
    weights = model.get_weights(include_optimizer=True)
    kept_weights = [a.copy() for _, a in weights]
    model.infer_batch(x[4:])
    model.fit(x, y, epochs=1, lr=0.3)
    assert np.array_equal(first, kept)
    assert all(np.array_equal(a, b) for (_, a), b in zip(weights, kept_weights, strict=True))
    assert not np.array_equal(model.infer_batch(x[:4]), kept)  # training did change the outputs


def test_fallback_to_litert_signature_runner_computes_the_same(small_cnn):
    """An ai-edge-litert without the tensor-index calls falls back to SignatureRunner: same numbers."""
    direct, fallback = small_cnn.runtime(), small_cnn.runtime()
    assert all(sig._wrapper is not None for sig in direct._runners.values())  # this build: the direct path
    for sig in fallback._runners.values():
        sig._wrapper = None
    x, y = _multiclass_data(8, small_cnn.manifest, seed=6)
    for model in (direct, fallback):
        model.set_weights(small_cnn.runtime().get_weights())
        model.fit(x, y, epochs=2, lr=0.1, mu=0.01)
    got, expected = _state(fallback), _state(direct)
    assert all(np.array_equal(got[n], expected[n]) for n in expected)
    np.testing.assert_array_equal(fallback.predict(x), direct.predict(x))
    assert fallback.evaluate(x, y) == direct.evaluate(x, y)


def test_load_manifest_errors_are_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError):
        load_manifest(bad)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ManifestError):
        load_manifest(binary)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, b"\x00" * 1024, b"\x1c\x00\x00\x00TFL3"],
    ids=["empty", "text", "png", "zeros", "header_only"],
)
def test_summarize_operators_rejects_non_tflite_bytes(data):
    with pytest.raises(ModelFileError):
        summarize_operators(data)


def test_summarize_operators_rejects_a_truncated_model(small_cnn):
    with pytest.raises(ModelFileError):
        summarize_operators(small_cnn.tflite[:64])
