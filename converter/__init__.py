"""litefed converter: Keras model -> trainable, builtin-only LiteRT model.

>>> from converter import ConvertConfig, convert
>>> convert("model.py:build", "out/model.tflite", ConvertConfig(batch_size=32))
"""

from converter.api import ConvertConfig, ConvertedModel, convert, convert_model
from converter.errors import ConverterError, ModelSpecError, UnsupportedModelError, VerificationError

__all__ = [
    "ConvertConfig",
    "ConvertedModel",
    "ConverterError",
    "ModelSpecError",
    "UnsupportedModelError",
    "VerificationError",
    "convert",
    "convert_model",
]
