"""The reference models convert to builtin-only LiteRT models that learn."""

from __future__ import annotations

import numpy as np

from edge_client.model_file import summarize_operators
from edge_client.runtime import TrainableModel
from tests.helpers import separable_binary_data


def test_mnist_cnn_converts_builtin_only_and_verifies(mnist_cnn):
    summary = summarize_operators(mnist_cnn.tflite)
    assert summary.custom == ()
    report = mnist_cnn.converted.report
    assert report is not None and report.steps == 3
    assert report.worst <= 1e-4
    assert mnist_cnn.manifest.verification == report.to_json()


def test_mnist_cnn_learns_on_real_mnist(mnist_cnn, mnist_data):
    # 40 steps at lr 0.1: Keras' own SGD needs about that long to leave the
    # ~2.3 plateau (after 20 steps at lr 0.05 it is still at ~2.2).
    model = TrainableModel.load(mnist_cnn.model_path)
    batch = model.batch_size
    x, y = mnist_data["x"], mnist_data["y"]
    losses, correct = [], []
    for step in range(40):
        sl = slice(step * batch, (step + 1) * batch)
        result = model.train_step(x[sl], y[sl], lr=0.1)
        assert np.isfinite(result.loss)
        losses.append(result.loss)
        correct.append(result.correct)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, f"loss did not fall enough: first 5 steps {first:.3f}, last 5 {last:.3f}"
    assert all(0 <= c <= batch for c in correct)
    assert np.mean(correct[-5:]) > np.mean(correct[:5])


def test_tabular_model_converts_builtin_only_and_verifies(tabular):
    assert summarize_operators(tabular.tflite).custom == ()
    assert tabular.converted.report is not None and tabular.converted.report.worst <= 1e-4
    assert tabular.manifest.optimizer["name"] == "adam"
    assert tabular.manifest.loss == {"name": "binary_crossentropy", "from_logits": False}


def test_tabular_model_learns_separable_data(tabular):
    model = TrainableModel.load(tabular.model_path)
    x, y = separable_binary_data(300, num_features=8, seed=1)  # 300 is not a multiple of the batch
    before = model.evaluate(x, y)
    rng = np.random.default_rng(0)
    epoch_losses = [model.fit(x, y, epochs=1, rng=rng).loss for _ in range(6)]
    after = model.evaluate(x, y)
    assert after.num_examples == 300
    assert epoch_losses[-1] < 0.5 * epoch_losses[0], epoch_losses
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.9, after


def test_a_spec_converts_to_the_same_initial_weights_for_the_same_seed(tmp_path):
    from converter import ConvertConfig, convert

    def initial_weights(name: str, seed: int):
        path = tmp_path / f"{name}.tflite"
        convert("converter.zoo:tabular_binary", path, ConvertConfig(batch_size=4, verify=False, seed=seed))
        return TrainableModel.load(path).get_weights()

    first, again, other = initial_weights("a", 0), initial_weights("b", 0), initial_weights("c", 1)
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(first, again, strict=True))
    assert not all(np.array_equal(x, y) for (_, x), (_, y) in zip(first, other, strict=True))
