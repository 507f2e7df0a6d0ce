"""Reading a ``.tflite`` flatbuffer without TensorFlow.

Used by the converter to refuse non-builtin operators before it writes a
model, and by devices to check a model they received before loading it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# The flatbuffer schema bindings ship inside ai-edge-litert.
from ai_edge_litert import schema_py_generated as schema  # noqa: E402

from edge_client.errors import ModelFileError

_BUILTIN_NAMES = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
_CUSTOM = schema.BuiltinOperator.CUSTOM


@dataclass(frozen=True)
class OperatorSummary:
    """Which operators a model uses, split into builtin and everything else."""

    builtin: tuple[str, ...]
    custom: tuple[str, ...]

    @property
    def is_builtin_only(self) -> bool:
        return not self.custom


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``: the model hash used in manifests and on the wire."""
    return hashlib.sha256(data).hexdigest()


def summarize_operators(model: bytes) -> OperatorSummary:
    """List the operator codes of a serialized TFLite model.

    Flex (SELECT_TF_OPS) operators are custom operators whose name starts
    with ``Flex``; they, like any other custom op, land in ``custom``.
    """
    if len(model) < 8 or model[4:8] != b"TFL3":
        raise ModelFileError("not a TensorFlow Lite model (file identifier 'TFL3' missing)")
    try:
        parsed = schema.Model.GetRootAsModel(model, 0)
        builtin, custom = set(), set()
        for i in range(parsed.OperatorCodesLength()):
            code = parsed.OperatorCodes(i)
            # Newer files store codes >= 127 in BuiltinCode(); DeprecatedBuiltinCode
            # saturates at 127 (PLACEHOLDER_FOR_GREATER_OP_CODES).
            value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if value == _CUSTOM:
                custom.add((code.CustomCode() or b"<unnamed>").decode())
            else:
                builtin.add(_BUILTIN_NAMES.get(value, f"BUILTIN_{value}"))
    except ModelFileError:
        raise
    except Exception as exc:  # flatbuffers raises assorted errors on garbage
        raise ModelFileError(f"cannot parse the TensorFlow Lite flatbuffer: {exc}") from exc
    return OperatorSummary(tuple(sorted(builtin)), tuple(sorted(custom)))


def require_builtin_only(model: bytes) -> OperatorSummary:
    """Return the operator summary, or raise if any non-builtin op is present."""
    summary = summarize_operators(model)
    if not summary.is_builtin_only:
        raise ModelFileError(
            "model uses non-builtin operators that the plain LiteRT interpreter cannot run: "
            + ", ".join(summary.custom)
            + ". Convert it with litefed-convert, which emits builtin operators only."
        )
    return summary
