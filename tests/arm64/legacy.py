"""Models as litefed converted them before manifest format_version 2 (issue 9).

Their ``train`` signature takes rank-0 ``lr`` and ``mu``; ai-edge-litert's aarch64
``SignatureRunner`` crashes (segmentation fault) resizing such an input. The
tests use them to check that the runtime refuses them with a message saying
to re-convert, instead of crashing. TensorFlow is imported lazily.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

LEGACY_FORMAT_VERSION = 1


def convert_legacy(keras_model, batch_size: int):
    """``(tflite, manifest)`` of ``keras_model`` with the pre-fix rank-0 ``lr``/``mu`` train inputs.

    The manifest is a current one (it claims the current format); only the graph is old.
    Use a model without scalar optimizer state (SGD), as the old converter's Adam
    counter was rank 0 too.
    """
    import tensorflow as tf

    from converter.api import ConvertConfig, _manifest, build_graph_spec, resolve_optimizer
    from converter.graph import TrainingModule, to_tflite

    class LegacyModule(TrainingModule):
        def signatures(self):
            sigs = super().signatures()
            spec, b = self.spec, self.spec.batch_size
            x = tf.TensorSpec([b, *spec.input_shape], spec.input_dtype, name="x")
            y = tf.TensorSpec(spec.head.label_shape(b), spec.head.label_dtype, name="y")
            w = tf.TensorSpec([b], tf.float32, name="sample_weight")
            lr, mu = tf.TensorSpec([], tf.float32, name="lr"), tf.TensorSpec([], tf.float32, name="mu")
            sigs["train"] = tf.function(self.train).get_concrete_function(x, y, w, lr, mu)
            return sigs

    config = ConvertConfig(batch_size=batch_size, verify=False)
    spec, from_logits = build_graph_spec(keras_model, config, resolve_optimizer(keras_model, config))
    module = LegacyModule(spec)
    with tempfile.TemporaryDirectory(prefix="litefed-legacy-") as tmp:
        tflite = to_tflite(module, tmp)
    return tflite, _manifest(keras_model, spec, module, tflite, from_logits)


def save_legacy(tflite: bytes, manifest, path: Path, format_version: int | None = None) -> Path:
    """Write the model and its manifest (optionally claiming ``format_version``); return the model path."""
    path.write_bytes(tflite)
    obj = manifest.to_json()
    if format_version is not None:
        obj["format_version"] = format_version
    path.with_suffix(".json").write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return path
