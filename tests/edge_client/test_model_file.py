"""Reading operator codes from a .tflite without the generated schema module."""

from __future__ import annotations

import pytest
from ai_edge_litert import schema_py_generated as schema

from edge_client.errors import ModelFileError
from edge_client.model_file import custom_operators, require_builtin_only, summarize_operators


def _schema_codes(model: bytes) -> tuple[set[int], set[str]]:
    """Builtin codes and custom names read through the full generated schema."""
    parsed = schema.Model.GetRootAsModel(model, 0)
    builtin, custom = set(), set()
    for i in range(parsed.OperatorCodesLength()):
        code = parsed.OperatorCodes(i)
        value = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if value == schema.BuiltinOperator.CUSTOM:
            custom.add(code.CustomCode().decode())
        else:
            builtin.add(value)
    return builtin, custom


@pytest.mark.parametrize("fixture", ["mnist_cnn", "tabular", "flex_model"])
def test_light_reader_agrees_with_the_full_schema(request, fixture):
    value = request.getfixturevalue(fixture)
    model = value if isinstance(value, bytes) else value.tflite
    builtin_codes, custom_names = _schema_codes(model)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    summary = summarize_operators(model)
    assert set(summary.custom) == custom_names == set(custom_operators(model))
    assert set(summary.builtin) == {names[c] for c in builtin_codes}
    assert summary.builtin  # every model here has builtin ops too


def test_flex_model_is_refused_with_its_op_name(flex_model):
    assert custom_operators(flex_model) == ("FlexReluGrad",)
    with pytest.raises(ModelFileError, match="FlexReluGrad.*litefed-convert"):
        require_builtin_only(flex_model)


@pytest.mark.parametrize("junk", [b"", b"TFL3", b"\x00" * 16, b"1234TFL3" + b"\xff" * 64])
def test_garbage_is_a_model_file_error(junk):
    with pytest.raises(ModelFileError):
        custom_operators(junk)


def test_loading_a_model_does_not_import_the_schema_module(run_without_tensorflow, tabular):
    code = (
        "import sys, json\n"
        "from edge_client.runtime import TrainableModel\n"
        "TrainableModel.load(sys.argv[1])\n"
        "print(json.dumps('ai_edge_litert.schema_py_generated' in sys.modules))\n"
    )
    result = run_without_tensorflow(code, str(tabular.model_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "false"
