"""Local data sources: .npz, image folders, CSV, and fitting data to a model's manifest."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edge_client.data import load_csv, load_image_folder, load_npz, prepare_for_model
from edge_client.errors import DataError
from edge_client.manifest import Manifest
from edge_client.weights import TensorSpec
from tests.helpers import REPO_ROOT

BATCH = 8


def make_manifest(task: str, input_shape: tuple[int, ...], num_outputs: int) -> Manifest:
    """A manifest shaped like the converter's for ``task`` (no model behind it)."""
    label = (
        TensorSpec("y", (BATCH,), "int32") if task == "multiclass" else TensorSpec("y", (BATCH, num_outputs), "float32")
    )
    return Manifest(
        model_name=f"test_{task}",
        task=task,
        batch_size=BATCH,
        input=TensorSpec("x", (BATCH, *input_shape), "float32"),
        label=label,
        output=TensorSpec("output", (BATCH, num_outputs), "float32"),
        num_classes={"multiclass": num_outputs, "binary": 2, "regression": 0}[task],
        loss={},
        optimizer={"name": "sgd", "learning_rate": 0.1},
        weights=(),
        optimizer_state=(),
        signatures={},
        model_sha256="0" * 64,
        converter_version="test",
    )


MNIST_LIKE = make_manifest("multiclass", (28, 28, 1), 10)
BINARY = make_manifest("binary", (4,), 1)
REGRESSION = make_manifest("regression", (3,), 2)
ONE_HOT = dataclasses.replace(  # categorical cross-entropy: a [B, K] float label
    make_manifest("multiclass", (4,), 3), label=TensorSpec("y", (BATCH, 3), "float32")
)


# -- load_npz ------------------------------------------------------------------------


def test_load_npz_default_and_keras_keys(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(3, 2, 4)
    y = np.array([2, 0, 1], np.uint8)
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x[:1], y_test=y[:1])
    got_x, got_y = load_npz(tmp_path / "plain.npz")
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    assert got_x.dtype == np.uint8
    test_x, test_y = load_npz(str(tmp_path / "mnist.npz"), x_key="x_test", y_key="y_test")
    np.testing.assert_array_equal(test_x, x[:1])
    np.testing.assert_array_equal(test_y, y[:1])


def test_load_npz_errors(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 3)), y_train=np.zeros(2))
    with pytest.raises(DataError, match=r"no array 'x_test'; it holds \['x_train', 'y_train'\]: name the arrays"):
        load_npz(tmp_path / "mnist.npz", "x_test", "y_test")
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip archive")
    with pytest.raises(DataError, match="cannot read .*junk.npz as a NumPy .npz archive"):
        load_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "ragged.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match=r"x has shape \[3, 2\] but y has \[4\]"):
        load_npz(tmp_path / "ragged.npz")


# -- load_image_folder -----------------------------------------------------------------


def blocks(height: int, width: int, seed: int, channels: int = 0, factor: int = 1) -> np.ndarray:
    """A random uint8 image, each pixel repeated into a factor x factor block."""
    shape = (height, width, channels) if channels else (height, width)
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def write_png(path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def as_float(image_uint8: np.ndarray) -> np.ndarray:
    return image_uint8.astype(np.float32) / np.float32(255)


def test_grayscale_folder_values_labels_and_resizing(tmp_path, caplog):
    # Target 4 x 6 (H != W, so swapped resize axes would show). Each 2x2 block of the
    # big images is constant, so INTER_AREA's 2x downscale gives the small image exactly.
    small = {name: blocks(4, 6, seed) for seed, name in enumerate(["cat/a.png", "cat/b.png", "dog/c.png", "owl/d.png"])}
    write_png(tmp_path / "cat/a.png", small["cat/a.png"])  # already the right size
    write_png(tmp_path / "cat/b.png", small["cat/b.png"].repeat(2, 0).repeat(2, 1))
    write_png(tmp_path / "dog/c.png", small["dog/c.png"].repeat(2, 0).repeat(2, 1))
    write_png(tmp_path / "owl/d.png", small["owl/d.png"])
    (tmp_path / "dog/broken.png").write_bytes(b"not a png at all")
    (tmp_path / "owl/empty.jpg").write_bytes(b"")
    (tmp_path / "owl/notes.txt").write_text("not an image, not counted")

    with caplog.at_level(logging.WARNING, logger="edge_client.data"):
        data = load_image_folder(tmp_path, (4, 6, 1))

    assert data.class_names == ("cat", "dog", "owl")
    assert data.x.shape == (4, 4, 6, 1) and data.x.dtype == np.float32
    np.testing.assert_array_equal(data.y, [0, 0, 1, 2])
    assert data.y.dtype == np.int32
    for i, key in enumerate(["cat/a.png", "cat/b.png", "dog/c.png", "owl/d.png"]):
        np.testing.assert_array_equal(data.x[i, ..., 0], as_float(small[key]))
    assert sorted(p.name for p in data.skipped) == ["broken.png", "empty.jpg"]
    assert "broken.png" in caplog.text and "empty.jpg" in caplog.text
    assert "skipped 2 unreadable" in caplog.text


def test_colour_folder_is_rgb_and_resized_by_area(tmp_path):
    # Each 3x3 block on disk is its small-image value v with +4 around a centre of v - 32,
    # so the block mean (INTER_AREA) is exactly v while sampling (nearest, bilinear) is not.
    small_bgr = np.random.default_rng(7).integers(32, 252, (3, 5, 3)).astype(np.uint8)
    ring = np.array([[4, 4, 4], [4, -32, 4], [4, 4, 4]])
    big = small_bgr.repeat(3, 0).repeat(3, 1).astype(int) + np.tile(ring, (3, 5))[..., None]
    write_png(tmp_path / "a/img.png", big.astype(np.uint8))  # 9 x 15 on disk
    write_png(tmp_path / "b/img.png", blocks(3, 5, seed=8, channels=3))
    data = load_image_folder(tmp_path, (3, 5, 3))
    assert data.x.shape == (2, 3, 5, 3)
    np.testing.assert_array_equal(data.x[0], as_float(small_bgr[..., ::-1]))
    np.testing.assert_array_equal(data.x[1], as_float(blocks(3, 5, seed=8, channels=3)[..., ::-1]))
    np.testing.assert_array_equal(data.y, [0, 1])


def test_given_label_order_missing_and_extra_folders(tmp_path, caplog):
    for name, value in [("zero", 0), ("two", 200), ("extra", 100)]:
        write_png(tmp_path / name / "x.png", np.full((2, 2), value, np.uint8))
    with caplog.at_level(logging.WARNING, logger="edge_client.data"):
        data = load_image_folder(tmp_path, (2, 2, 1), labels=["zero", "one", "two"])
    assert data.class_names == ("zero", "one", "two")
    np.testing.assert_array_equal(data.y, [0, 2])  # "one" has no folder on this device
    np.testing.assert_array_equal(data.x[:, 0, 0, 0], [0.0, np.float32(200) / np.float32(255)])
    assert "ignoring folders ['extra']" in caplog.text


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", (2, 2, 1))
    with pytest.raises(DataError, match="no label sub-folders"):
        load_image_folder(tmp_path, (2, 2, 1))
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "bad.png").write_bytes(b"\x89PNG but truncated")
    with pytest.raises(DataError, match="no readable images"):
        load_image_folder(tmp_path, (2, 2, 1))
    with pytest.raises(DataError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, got 4"):
        load_image_folder(tmp_path, (2, 2, 4))
    with pytest.raises(DataError, match="image_shape must be"):
        load_image_folder(tmp_path, (2, 2))
    with pytest.raises(DataError, match="labels must be unique"):
        load_image_folder(tmp_path, (2, 2, 1), labels=["cat", "cat"])


def test_missing_opencv_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(DataError, match=r"pip install 'litefed\[camera\]'"):
        load_image_folder(tmp_path, (2, 2, 1))


def test_importing_data_does_not_import_opencv():
    code = "import sys, edge_client.data; assert 'cv2' not in sys.modules, 'cv2 imported eagerly'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- load_csv -------------------------------------------------------------------------


def test_csv_with_header_label_by_name(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("age,label,income\n31,1,2.5\n\n45,0,-1e3\n")
    x, y = load_csv(path, label_column="label")
    np.testing.assert_array_equal(x, np.array([[31, 2.5], [45, -1000]], np.float32))
    np.testing.assert_array_equal(y, [1, 0])
    assert x.dtype == np.float32 and y.dtype == np.int64


def test_csv_without_header_last_column_default(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("0.5,1,2.25\n-3,4,0.75\n")
    x, y = load_csv(path)
    np.testing.assert_array_equal(x, np.array([[0.5, 1], [-3, 4]], np.float32))
    np.testing.assert_array_equal(y, np.array([2.25, 0.75], np.float32))
    assert y.dtype == np.float32  # fractional labels stay real-valued
    x0, y0 = load_csv(path, label_column=0, has_header=False)
    np.testing.assert_array_equal(x0, np.array([[1, 2.25], [4, 0.75]], np.float32))
    np.testing.assert_array_equal(y0, np.array([0.5, -3], np.float32))


def test_csv_forced_header_and_delimiter(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("1\t2\t0\n3\t4\t1\n")
    x, y = load_csv(path, has_header=True, delimiter="\t")  # the first row is dropped as a header
    np.testing.assert_array_equal(x, [[3, 4]])
    np.testing.assert_array_equal(y, [1])


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("a,b,y\n1,2,0\n3,x,1\n", {}, r"line 3, column 2 \('b'\): 'x' is not a finite number"),
        ("1,2,0\n3,,1\n", {}, r"line 2, column 2: '' is not a finite number"),
        ("1,2,0\n3,nan,1\n", {}, r"line 2, column 2: 'nan' is not a finite number"),
        ("1,2,0\n3,4\n", {}, r"line 2: 2 cells, expected 3"),
        ("a,b,y\n", {}, "has no data rows"),
        ("\n\n", {}, "is empty"),
        ("1,2,0\n", {"label_column": "y"}, "is a name but .* has no header"),
        ("a,b,y\n1,2,0\n", {"label_column": "z"}, r"no column 'z'; its columns are \['a', 'b', 'y'\]"),
        ("1,2,0\n", {"label_column": 3}, "label_column 3 is not a column"),
        ("1\n2\n", {}, "single column"),
    ],
)
def test_csv_errors(tmp_path, text, kwargs, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_csv(path, **kwargs)


def test_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_csv(tmp_path / "nope.csv")


# -- prepare_for_model -------------------------------------------------------------------


def test_prepare_mnist_adds_channel_and_casts():
    x = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    y = np.array([9, 0, 3], np.uint8)
    px, py = prepare_for_model(x, y, MNIST_LIKE)
    assert px.shape == (3, 28, 28, 1) and px.dtype == np.float32
    np.testing.assert_array_equal(px[..., 0], x.astype(np.float32) / np.float32(255))  # 8-bit pixels -> [0, 1]
    assert py.shape == (3,) and py.dtype == np.int32
    np.testing.assert_array_equal(py, [9, 0, 3])
    _, py2 = prepare_for_model(x, y[:, None].astype(np.float64), MNIST_LIKE)  # [N, 1] whole-number floats
    np.testing.assert_array_equal(py2, [9, 0, 3])


def test_prepare_binary_and_regression_labels():
    x = np.ones((2, 4), np.float64)
    px, py = prepare_for_model(x, np.array([1, 0]), BINARY)
    assert px.dtype == np.float32 and py.shape == (2, 1) and py.dtype == np.float32
    np.testing.assert_array_equal(py, [[1.0], [0.0]])
    _, py = prepare_for_model(np.ones((2, 3)), np.array([[0.5, -2.0], [3.0, 4.0]]), REGRESSION)
    np.testing.assert_array_equal(py, np.array([[0.5, -2.0], [3.0, 4.0]], np.float32))


def test_class_ids_become_one_hot_for_a_categorical_model_and_soft_labels_pass():
    x = np.ones((3, 4))
    _, py = prepare_for_model(x, np.array([2, 0, 1]), ONE_HOT)
    np.testing.assert_array_equal(py, np.eye(3, dtype=np.float32)[[2, 0, 1]])
    soft = np.array([[0.2, 0.8, 0.0], [1, 0, 0], [0, 0.5, 0.5]])
    _, py = prepare_for_model(x, soft, ONE_HOT)
    assert py.dtype == np.float32 and py.shape == (3, 3)
    with pytest.raises(DataError, match=r"in \[0, 3\)"):
        prepare_for_model(x, np.array([0, 3, 1]), ONE_HOT)
    with pytest.raises(DataError, match=r"lie in \[0, 1\]"):
        prepare_for_model(x, soft * 2, ONE_HOT)


@pytest.mark.parametrize(
    ("x", "y", "manifest", "message"),
    [
        (np.zeros((2, 28, 27)), np.zeros(2), MNIST_LIKE, r"expects x of shape \[N, 28, 28, 1\], got \[2, 28, 27\]"),
        (np.zeros((2, 5)), np.zeros(2), BINARY, r"expects x of shape \[N, 4\], got \[2, 5\]"),
        (np.zeros((2, 4)), np.zeros(3), BINARY, r"x has shape \[2, 4\] but y has \[3\]"),
        (np.zeros((0, 4)), np.zeros(0), BINARY, "no examples"),
        (
            np.zeros((2, 28, 28, 1)),
            np.array([0, 10]),
            MNIST_LIKE,
            r"in \[0, 10\); 1 of 2 are not, the first is y\[1\] = 10$",
        ),
        (np.zeros((2, 28, 28, 1)), np.array([-1, 3]), MNIST_LIKE, r"the first is y\[0\] = -1$"),
        (np.zeros((2, 28, 28, 1)), np.array([1.5, 3]), MNIST_LIKE, "whole numbers"),
        (np.zeros((2, 28, 28, 1)), np.zeros((2, 10)), MNIST_LIKE, r"expects labels of shape \[N\], got \[2, 10\]"),
        (np.zeros((2, 3)), np.zeros((2, 3)), REGRESSION, r"expects labels of shape \[N, 2\], got \[2, 3\]"),
        (np.zeros((2, 4)), np.array([0.0, 2.0]), BINARY, r"binary labels must lie in \[0, 1\]"),
        (np.zeros((2, 4)), np.array([0.0, np.nan]), BINARY, "labels must be finite"),
        (np.full((2, 4), np.inf), np.zeros(2), BINARY, "x contains NaN or Inf"),
        (np.array([["a"] * 4] * 2), np.zeros(2), BINARY, "x must be numeric"),
    ],
)
def test_prepare_errors(x, y, manifest, message):
    with pytest.raises(DataError, match=message):
        prepare_for_model(x, y, manifest)


def test_csv_to_a_converted_model(tmp_path, tabular):
    # The path a device takes: a CSV file, fitted to a real converted model's manifest,
    # then trained on (tabular: 8 features, binary labels of shape [batch, 1]).
    path = tmp_path / "d.csv"
    features = np.random.default_rng(0).normal(size=(20, 8)).round(3)
    labels = (features[:, 0] > 0).astype(int)
    path.write_text("".join(",".join(map(str, [*f, lab])) + "\n" for f, lab in zip(features, labels, strict=True)))
    x, y = prepare_for_model(*load_csv(path), tabular.manifest)
    np.testing.assert_array_equal(x, features.astype(np.float32))
    assert y.shape == (20, 1) and y.dtype == np.float32
    np.testing.assert_array_equal(y[:, 0], labels)
    metrics = tabular.runtime().fit(x, y)
    assert metrics.num_examples == 20 and np.isfinite(metrics.loss)


def test_uint8_pixels_scale_like_image_folders(tmp_path):
    """A board reading uint8 pixels from an npz gets exactly what an image folder of the same pixels gives."""
    pixels = np.random.default_rng(3).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    for label, image in zip("ab", pixels, strict=True):
        write_png(tmp_path / label / "x.png", image)
    folder = load_image_folder(tmp_path, (28, 28, 1))
    px, _ = prepare_for_model(pixels, np.array([0, 1]), MNIST_LIKE)
    np.testing.assert_array_equal(px, folder.x)
    assert px.min() >= 0.0 and px.max() <= 1.0


def test_float_inputs_are_not_rescaled():
    x = np.full((2, 28, 28), 0.5, np.float64)
    px, _ = prepare_for_model(x, np.array([0, 1]), MNIST_LIKE)
    np.testing.assert_array_equal(px, np.full((2, 28, 28, 1), 0.5, np.float32))


def test_raw_pixels_stored_as_float_warn(caplog):
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28)).astype(np.float32)
    with caplog.at_level("WARNING", logger="edge_client.data"):
        prepare_for_model(x, np.array([0, 1]), MNIST_LIKE)
    assert "divide by 255" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="edge_client.data"):
        prepare_for_model(x / 255, np.array([0, 1]), MNIST_LIKE)
    assert caplog.text == ""


def test_npz_with_keras_keys_trains_on_the_training_split(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=np.ones((3, 2)), y_train=np.arange(3), x_test=np.zeros((1, 2)), y_test=np.zeros(1))
    x, y = load_npz(path)
    assert x.shape == (3, 2) and list(y) == [0, 1, 2]
    x, y = load_npz(path, "x_test", "y_test")
    assert x.shape == (1, 2)


def test_npz_missing_keys_says_how_to_name_them(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.ones((3, 2)), labels=np.arange(3))
    with pytest.raises(DataError, match=r"holds \['images', 'labels'\].*--x-key/--y-key"):
        load_npz(path)
