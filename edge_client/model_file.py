"""Reading a ``.tflite`` flatbuffer without TensorFlow.

Used by the converter to refuse non-builtin operators before it writes a
model, and by devices to check a model they received before loading it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import flatbuffers.encode
import flatbuffers.number_types
import flatbuffers.packer
import flatbuffers.table

from edge_client.errors import ModelFileError

_CUSTOM = 32  # BuiltinOperator.CUSTOM in the TFLite schema
# Field slots of the schema tables we read (vtable offset = 4 + 2 * field index).
_MODEL_OPERATOR_CODES = 4 + 2 * 1
_CODE_DEPRECATED_BUILTIN = 4 + 2 * 0
_CODE_CUSTOM_NAME = 4 + 2 * 1
_CODE_BUILTIN = 4 + 2 * 3


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


def _operator_codes(model: bytes) -> list[tuple[int, str | None]]:
    """``(builtin code, custom name or None)`` of every operator code.

    Reads only the ``operator_codes`` vector with the flatbuffers runtime,
    instead of importing the generated schema module (4 MB of RSS on a board).
    """
    if len(model) < 8 or model[4:8] != b"TFL3":
        raise ModelFileError("not a TensorFlow Lite model (file identifier 'TFL3' missing)")
    try:
        root = flatbuffers.table.Table(model, flatbuffers.encode.Get(flatbuffers.packer.uoffset, model, 0))
        vector = root.Offset(_MODEL_OPERATOR_CODES)
        if not vector:
            return []
        start, count = root.Vector(vector), root.VectorLen(vector)
        codes = []
        for i in range(count):
            code = flatbuffers.table.Table(model, root.Indirect(start + 4 * i))
            deprecated = _field(code, _CODE_DEPRECATED_BUILTIN, flatbuffers.number_types.Int8Flags, 0)
            # Codes >= 127 live in builtin_code; the deprecated int8 field saturates at 127.
            value = max(deprecated, _field(code, _CODE_BUILTIN, flatbuffers.number_types.Int32Flags, 0))
            name_offset = code.Offset(_CODE_CUSTOM_NAME)
            name = code.String(name_offset + code.Pos).decode() if name_offset else None
            codes.append((value, name))
        return codes
    except Exception as exc:  # flatbuffers raises assorted errors on garbage
        raise ModelFileError(f"cannot parse the TensorFlow Lite flatbuffer: {exc}") from exc


def _field(table: flatbuffers.table.Table, slot: int, flags: type, default: int) -> int:
    offset = table.Offset(slot)
    return table.Get(flags, offset + table.Pos) if offset else default


def custom_operators(model: bytes) -> tuple[str, ...]:
    """Names of the non-builtin operators (Flex ops are custom ops named ``Flex*``)."""
    return tuple(sorted({name or "<unnamed>" for value, name in _operator_codes(model) if value == _CUSTOM}))


def summarize_operators(model: bytes) -> OperatorSummary:
    """Builtin operator names and custom operator names of a serialized model."""
    from ai_edge_litert import schema_py_generated as schema  # big module: load only when names are wanted

    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = _operator_codes(model)
    builtin = {names.get(value, f"BUILTIN_{value}") for value, _ in codes if value != _CUSTOM}
    return OperatorSummary(tuple(sorted(builtin)), custom_operators(model))


def require_builtin_only(model: bytes) -> None:
    """Raise :class:`ModelFileError` if the model has any non-builtin operator."""
    custom = custom_operators(model)
    if custom:
        raise ModelFileError(
            "model uses non-builtin operators that the plain LiteRT interpreter cannot run: "
            + ", ".join(custom)
            + ". Convert it with litefed-convert, which emits builtin operators only."
        )
