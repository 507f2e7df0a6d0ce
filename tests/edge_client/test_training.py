"""Local training and update encoding shared by the edge client and the simulator."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.error_feedback import ErrorFeedback
from edge_client.frames import decode_frame
from edge_client.training import TrainingDiverged, encode_update, train_local, uses_error_feedback
from edge_client.weights import NamedArray
from tests.helpers import separable_binary_data

SHA = "ab" * 32
RUN = "0123456789abcdef"


@pytest.fixture()
def runtime(tabular):
    return tabular.runtime()


def test_the_delta_is_trained_minus_start_and_metrics_are_reported(runtime):
    x, y = separable_binary_data(64, seed=0)
    start = runtime.get_weights()
    result = train_local(runtime, start, x, y, epochs=2, lr=0.05, rng=np.random.default_rng(0))
    assert result.epochs == 2 and result.num_examples == 64
    assert set(result.metrics) == {"loss", "accuracy", "train_seconds"}
    for (name, d), (_, s), (_, w) in zip(result.delta, start, runtime.get_weights(), strict=True):
        np.testing.assert_allclose(s + d, w, atol=1e-6, err_msg=name)
    assert any(np.abs(d).max() > 1e-4 for _, d in result.delta)


def test_same_seed_same_delta(runtime):
    x, y = separable_binary_data(64, seed=0)
    start = runtime.get_weights()
    a = train_local(runtime, start, x, y, epochs=1, lr=0.05, rng=np.random.default_rng(7))
    b = train_local(runtime, start, x, y, epochs=1, lr=0.05, rng=np.random.default_rng(7))
    for (_, da), (_, db) in zip(a.delta, b.delta, strict=True):
        np.testing.assert_array_equal(da, db)


def test_keep_going_stops_between_epochs(runtime):
    x, y = separable_binary_data(32, seed=0)
    start = runtime.get_weights()
    answers = iter([True, False])
    result = train_local(runtime, start, x, y, epochs=5, lr=0.05, keep_going=lambda: next(answers))
    assert result.epochs == 1
    assert train_local(runtime, start, x, y, epochs=5, lr=0.05, keep_going=lambda: False) is None


def test_divergence_raises(runtime):
    x, y = separable_binary_data(32, seed=0)
    with pytest.raises(TrainingDiverged, match="lower learning rate"):
        train_local(runtime, runtime.get_weights(), x * 1e30, y, epochs=1, lr=1e10)


def test_error_feedback_applies_to_lossy_codecs_only(runtime):
    assert not uses_error_feedback("float32")
    assert all(uses_error_feedback(c) for c in ("float16", "int8", "int8-channel", "topk:0.1"))
    x, y = separable_binary_data(64, seed=0)
    result = train_local(runtime, runtime.get_weights(), x, y, epochs=1, lr=0.05)
    feedback = ErrorFeedback()
    encode_update(result, round=1, run=RUN, model_sha256=SHA, client_id="c", codec="float32", feedback=feedback)
    assert feedback.state_dict() == {}

    payload = encode_update(
        result, round=1, run=RUN, model_sha256=SHA, client_id="c", codec="topk:0.25", feedback=feedback
    )
    frame = decode_frame(payload)
    assert (frame.run, frame.round, frame.client_id, frame.codec, frame.num_examples) == (RUN, 1, "c", "topk:0.25", 64)
    for (name, sent), (_, delta) in zip(frame.tensors, result.delta, strict=True):
        np.testing.assert_allclose(sent + feedback.residual(name), delta, atol=1e-7)

    # The next update carries the residual: sent_1 + sent_2 + residual_2 = 2 * delta.
    second = encode_update(
        result, round=2, run=RUN, model_sha256=SHA, client_id="c", codec="topk:0.25", feedback=feedback
    )
    for (name, s1), (_, s2), (_, delta) in zip(frame.tensors, decode_frame(second).tensors, result.delta, strict=True):
        np.testing.assert_allclose(s1 + s2 + feedback.residual(name), 2 * delta, atol=1e-6)


def test_an_unencodable_update_leaves_the_residuals_alone(runtime):
    x, y = separable_binary_data(16, seed=0)
    result = train_local(runtime, runtime.get_weights(), x, y, epochs=1, lr=0.05)
    huge = result.__class__([NamedArray(n, d + 1e6) for n, d in result.delta], 16, result.metrics, 1)
    feedback = ErrorFeedback()
    with pytest.raises(Exception, match="float16"):
        encode_update(huge, round=1, run=RUN, model_sha256=SHA, client_id="c", codec="float16", feedback=feedback)
    assert feedback.state_dict() == {}
