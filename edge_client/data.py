"""A device's own training data: NumPy archives, image folders and CSV files.

Loaders return plain arrays; :func:`prepare_for_model` then checks and
casts them to what a converted model expects. Only NumPy is imported here:
OpenCV is the optional ``camera`` extra, imported when images are read.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from edge_client.errors import DataError
from edge_client.manifest import Manifest

log = logging.getLogger(__name__)

_NUMERIC = "biuf"  # dtype kinds a model input or label can be cast from

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm"})


# -- NumPy archives ------------------------------------------------------------------


def load_npz(path: str | Path, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels from an ``.npz`` file, as stored.

    With the default keys, a file without ``x``/``y`` but with Keras'
    ``x_train``/``y_train`` (as in ``mnist.npz``) gives its training split.
    Other names are passed as ``x_key``/``y_key``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            x_key, y_key = _npz_keys(data.files, x_key, y_key, path)
            x, y = data[x_key], data[y_key]
    except FileNotFoundError as exc:
        raise DataError(f"data file {path} not found") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a NumPy .npz archive: {exc}") from exc
    _check_same_length(x, y, str(path))
    return x, y


def _npz_keys(files: list[str], x_key: str, y_key: str, path: Path) -> tuple[str, str]:
    """The arrays to read: the given keys, or Keras' training split when the defaults are absent."""
    if (x_key, y_key) == ("x", "y") and "x" not in files and {"x_train", "y_train"} <= set(files):
        log.info("%s has no 'x'/'y' arrays; training on its 'x_train'/'y_train'", path)
        return "x_train", "y_train"
    missing = [k for k in (x_key, y_key) if k not in files]
    if missing:
        raise DataError(
            f"{path} has no array {missing[0]!r}; it holds {sorted(files)}: name the arrays to use "
            "(litefed-client --x-key/--y-key, or x_key/y_key under [data])"
        )
    return x_key, y_key


# -- image folders -------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolder:
    """Images read from one sub-folder per label.

    ``x`` is float32 ``[N, H, W, C]`` in [0, 1], ``y`` int32 label ids,
    ``class_names[i]`` the folder of label ``i``, and ``skipped`` the files
    that could not be decoded.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    skipped: tuple[Path, ...]


def load_image_folder(
    path: str | Path, image_shape: tuple[int, ...], labels: Sequence[str] | None = None
) -> ImageFolder:
    """Read ``path/<label>/*.png|jpg|...`` and resize every image to ``image_shape = (H, W, C)``.

    Label ids follow the sorted folder names, or ``labels`` when given: then
    folder ``labels[i]`` is label ``i``, a missing folder just means no
    examples of that label on this device, and folders not in ``labels``
    are ignored with a warning. Files that cannot be decoded are skipped
    with a warning and listed in ``skipped``.
    """
    cv2 = _import_cv2()
    height, width, channels = _check_image_shape(image_shape)
    folders = _label_folders(Path(path), labels)
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    images, ids, skipped = [], [], []
    for label_id, folder in enumerate(folders):
        for file in _image_files(folder):
            image = _read_image(cv2, file, flag)
            if image is None:
                log.warning("skipping %s: not a readable image", file)
                skipped.append(file)
                continue
            if image.shape[:2] != (height, width):
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)  # dsize is (W, H)
            images.append(image.reshape(height, width, channels) if channels == 1 else image[..., ::-1])
            ids.append(label_id)
    if skipped:
        log.warning("skipped %d unreadable image file(s) under %s", len(skipped), path)
    if not images:
        raise DataError(f"no readable images under {path}; expected image files in {path}/<label>/")
    x = np.stack(images).astype(np.float32)
    x /= 255.0
    return ImageFolder(x, np.array(ids, np.int32), tuple(f.name for f in folders), tuple(skipped))


def _import_cv2() -> ModuleType:
    try:
        import cv2
    except ImportError as exc:
        raise DataError("reading images needs OpenCV; install it with: pip install 'litefed[camera]'") from exc
    return cv2


def _check_image_shape(image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(image_shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in image_shape):
        raise DataError(f"image_shape must be (height, width, channels) of positive ints, got {image_shape!r}")
    if image_shape[2] not in (1, 3):
        raise DataError(f"images can have 1 (grayscale) or 3 (RGB) channels, got {image_shape[2]}")
    return int(image_shape[0]), int(image_shape[1]), int(image_shape[2])


def _label_folders(root: Path, labels: Sequence[str] | None) -> list[Path]:
    """One folder per label id, in label order (a given label's folder may not exist)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{root} has no label sub-folders; put each label's images in {root}/<label>/")
    if labels is None:
        return [root / name for name in found]
    if len(set(labels)) != len(labels):
        raise DataError(f"labels must be unique, got {list(labels)}")
    ignored = sorted(set(found) - set(labels))
    if ignored:
        log.warning("ignoring folders %s under %s: not among the given labels", ignored, root)
    return [root / name for name in labels]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(cv2: ModuleType, file: Path, flag: int) -> np.ndarray | None:
    """Decode ``file`` (8-bit, BGR or grayscale) or return None if it is not a readable image."""
    try:
        # imdecode of the bytes, unlike imread, handles any path on every platform.
        return cv2.imdecode(np.fromfile(file, np.uint8), flag)
    except (OSError, cv2.error):
        return None


# -- CSV -------------------------------------------------------------------------


def load_csv(
    path: str | Path, label_column: str | int = -1, has_header: bool | None = None, delimiter: str = ","
) -> tuple[np.ndarray, np.ndarray]:
    """Numeric features as float32 ``[N, F]`` and the label column.

    Labels are int64 when every label is a whole number, float32 otherwise.
    ``has_header=None`` treats the first row as a header when none of its
    cells is a number. ``label_column`` is an index (negative counts from the
    end) or, with a header, a column name.
    """
    path = Path(path)
    rows = _read_rows(path, delimiter)
    if has_header is None:
        has_header = _looks_like_header(rows[0][1])
    header = rows[0][1] if has_header else None
    data = rows[1:] if header is not None else rows
    if not data:
        raise DataError(f"{path} has no data rows")
    width = len(rows[0][1])
    label = _label_index(label_column, header, width, path)
    values = np.empty((len(data), width), np.float64)
    for i, (line, cells) in enumerate(data):
        if len(cells) != width:
            raise DataError(f"{path}, line {line}: {len(cells)} cells, expected {width} like the first row")
        for j, cell in enumerate(cells):
            values[i, j] = _parse_number(cell, path, line, j, header)
    y = values[:, label]
    x = np.delete(values, label, axis=1).astype(np.float32)
    return x, (y.astype(np.int64) if np.all(y == np.round(y)) else y.astype(np.float32))


def _read_rows(path: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """Non-blank rows with their line numbers."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter=delimiter)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except FileNotFoundError as exc:
        raise DataError(f"CSV file {path} not found") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as UTF-8 CSV: {exc}") from exc
    if not rows:
        raise DataError(f"{path} is empty")
    return rows


def _looks_like_header(cells: list[str]) -> bool:
    return not any(_is_number(cell) for cell in cells)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _label_index(label_column: str | int, header: list[str] | None, width: int, path: Path) -> int:
    if isinstance(label_column, str):
        if header is None:
            raise DataError(f"label_column {label_column!r} is a name but {path} has no header; pass an index")
        names = [name.strip() for name in header]
        if label_column not in names:
            raise DataError(f"{path} has no column {label_column!r}; its columns are {names}")
        return names.index(label_column)
    if width < 2:
        raise DataError(f"{path} has a single column; it needs at least one feature besides the label")
    if isinstance(label_column, bool) or not isinstance(label_column, int) or not -width <= label_column < width:
        raise DataError(f"label_column {label_column!r} is not a column of {path}, which has {width} columns")
    return label_column % width


def _parse_number(cell: str, path: Path, line: int, column: int, header: list[str] | None) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        name = f" ({header[column].strip()!r})" if header is not None else ""
        raise DataError(f"{path}, line {line}, column {column + 1}{name}: {cell!r} is not a finite number")
    return value


# -- fitting data to a model ---------------------------------------------------------


def prepare_for_model(x: np.ndarray, y: np.ndarray, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Check ``(x, y)`` against the model and cast them to its input and label dtypes.

    ``x`` must have the per-example input shape ``manifest.input.shape[1:]``
    (a missing trailing channel axis of size 1 is added). uint8 inputs are
    8-bit pixels: a float model gets them divided by 255, into the [0, 1]
    that image folders give too, so a board and the coordinator read the
    same file the same way. Other dtypes are cast unchanged. Labels become
    int32 ``[N]`` class ids for multiclass models and float32 ``[N, K]``
    otherwise.
    """
    x, y = np.asarray(x), np.asarray(y)
    _check_same_length(x, y, "x and y")
    if len(x) == 0:
        raise DataError("no examples: x and y are empty")
    return _prepare_inputs(x, manifest), _prepare_labels(y, manifest)


def _prepare_inputs(x: np.ndarray, manifest: Manifest) -> np.ndarray:
    expected = tuple(manifest.input.shape[1:])
    if x.shape[1:] != expected and expected[-1:] == (1,) and x.shape[1:] == expected[:-1]:
        x = x[..., None]  # e.g. [N, 28, 28] MNIST for a [28, 28, 1] input
    if x.shape[1:] != expected:
        raise DataError(
            f"model {manifest.model_name!r} expects x of shape {_shape_text(expected)}, got {list(x.shape)}"
        )
    if x.dtype.kind not in _NUMERIC:
        raise DataError(f"x must be numeric, got dtype {x.dtype}")
    float_model = np.dtype(manifest.input.dtype).kind == "f"
    if x.dtype == np.uint8 and float_model:
        # The same division as image folders and the coordinator's loaders: bit-identical inputs everywhere.
        return np.ascontiguousarray(x.astype(np.float32) / np.float32(255), dtype=manifest.input.dtype)
    x = np.ascontiguousarray(x, dtype=manifest.input.dtype)
    if not np.isfinite(x).all():
        raise DataError("x contains NaN or Inf; clean or drop those examples")
    if float_model and x.ndim == 4:
        _warn_if_raw_pixels(x)
    return x


def _warn_if_raw_pixels(x: np.ndarray) -> None:
    """Images stored as float 0..255 are almost always unscaled pixels, which train to garbage."""
    top = float(x.max())
    if top > 1.5 and top <= 255 and float(x.min()) >= 0 and np.array_equal(x, np.round(x)):
        log.warning(
            "x holds whole numbers up to %g, like raw 0-255 pixels stored as float; images (and uint8 arrays) "
            "train in [0, 1]: divide by 255, or store the images as uint8",
            top,
        )


def _prepare_labels(y: np.ndarray, manifest: Manifest) -> np.ndarray:
    expected = tuple(manifest.label.shape[1:])  # () for class ids, (K,) otherwise
    one_hot = manifest.task == "multiclass" and expected != ()  # categorical cross-entropy
    if one_hot and y.ndim == 1 and y.dtype.kind in _NUMERIC:
        _check_class_ids(y, manifest.num_classes)  # class ids (image folders, most files): one-hot them
        y = np.eye(manifest.num_classes, dtype=np.float32)[y.astype(np.int64)]
    if expected == (1,) and y.ndim == 1:
        y = y[:, None]  # [N] binary or regression targets for a [N, 1] label
    elif expected == () and y.shape[1:] == (1,):
        y = y[:, 0]  # [N, 1] class ids for a [N] label
    if y.shape[1:] != expected:
        raise DataError(
            f"model {manifest.model_name!r} ({manifest.task}) expects labels of shape {_shape_text(expected)}, "
            f"got {list(y.shape)}"
        )
    if y.dtype.kind not in _NUMERIC or not np.isfinite(y).all():
        raise DataError(f"labels must be finite numbers, got dtype {y.dtype} or NaN/Inf values")
    if manifest.task == "multiclass" and not one_hot:
        _check_class_ids(y, manifest.num_classes)
    elif (manifest.task == "binary" or one_hot) and ((y < 0) | (y > 1)).any():
        raise DataError(f"{manifest.task} labels must lie in [0, 1] (0 or 1 for hard labels)")
    return np.ascontiguousarray(y, dtype=manifest.label.dtype)


def _shape_text(per_example: tuple[int, ...]) -> str:
    return "[" + ", ".join(["N", *map(str, per_example)]) + "]"


def _check_class_ids(y: np.ndarray, num_classes: int) -> None:
    bad = np.flatnonzero((y != np.round(y)) | (y < 0) | (y >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"multiclass labels must be whole numbers in [0, {num_classes}); "
            f"{len(bad)} of {len(y)} are not, the first is y[{i}] = {y[i].item()}"
        )


def _check_same_length(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim == 0 or y.ndim == 0 or len(x) != len(y):
        raise DataError(f"{what}: x has shape {list(x.shape)} but y has {list(y.shape)}; they need one row per example")
