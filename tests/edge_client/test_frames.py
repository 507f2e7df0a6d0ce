"""Weight frames: exact round trips, and every malformed input is a ProtocolError."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_client.errors import ProtocolError
from edge_client.frames import FRAME_VERSION, MAGIC, Frame, decode_frame, encode_frame, validate_frame
from edge_client.messages import UNNAMED_RUN
from edge_client.weights import NamedArray, TensorSpec

SHA = "ab" * 32
RUN = "0123456789abcdef"

finite_f32 = st.floats(-1e6, 1e6, width=32, allow_nan=False)
tensors = st.lists(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5), elements=finite_f32),
    min_size=1,
    max_size=5,
)


def _frame(arrays, codec="float32", **kw) -> Frame:
    named = [NamedArray(f"layer{i}/kernel", a) for i, a in enumerate(arrays)]
    defaults = dict(kind="update", round=3, model_sha256=SHA, client_id="pi-7", num_examples=42, run=RUN)
    return Frame(tensors=named, codec=codec, metrics={"loss": 0.5}, **{**defaults, **kw})


@given(tensors)
def test_float32_round_trip_is_exact(arrays):
    frame = _frame(arrays)
    back = decode_frame(encode_frame(frame))
    assert (back.kind, back.run, back.round, back.model_sha256, back.client_id, back.num_examples) == (
        "update",
        RUN,
        3,
        SHA,
        "pi-7",
        42,
    )
    assert back.metrics == {"loss": 0.5}
    assert [t.name for t in back.tensors] == [t.name for t in frame.tensors]
    for got, sent in zip(back.tensors, frame.tensors, strict=True):
        assert got.array.dtype == np.float32 and got.array.shape == sent.array.shape
        np.testing.assert_array_equal(got.array, sent.array)


half_range = st.floats(-65000, 65000, width=32)
half_tensors = st.lists(
    hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=5), elements=half_range), min_size=1
)


@given(half_tensors)
def test_float16_round_trip_within_half_precision(arrays):
    back = decode_frame(encode_frame(_frame(arrays, codec="float16")))
    for got, sent in zip(back.tensors, arrays, strict=True):
        np.testing.assert_allclose(got.array, sent, rtol=2**-10, atol=6.2e-5)


def test_float16_refuses_values_it_cannot_represent():
    with pytest.raises(ProtocolError) as info:
        encode_frame(_frame([np.array([1.0, 70000.0], np.float32)], codec="float16"))
    assert info.value.reason == "out_of_range" and "float32" in str(info.value)


def test_float16_halves_the_payload():
    arrays = [np.random.default_rng(0).normal(size=(100, 100)).astype(np.float32)]
    assert len(encode_frame(_frame(arrays, codec="float16"))) < 0.55 * len(encode_frame(_frame(arrays)))


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=50)
@given(tensors, st.data())
def test_any_truncation_is_a_protocol_error(arrays, data):
    encoded = encode_frame(_frame(arrays))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ProtocolError):
        decode_frame(encoded[:cut])


@settings(max_examples=100)
@given(tensors, st.data())
def test_any_corrupted_byte_is_a_protocol_error(arrays, data):
    encoded = bytearray(encode_frame(_frame(arrays)))
    pos = data.draw(st.integers(0, len(encoded) - 1))
    encoded[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        decode_frame(bytes(encoded))


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_protocol_error(blob):
    with pytest.raises(ProtocolError):
        decode_frame(blob)


def _forge(header: dict, payload: bytes = b"", magic: bytes = MAGIC, version: int = FRAME_VERSION) -> bytes:
    """A frame with a valid checksum around any header: tests the header checks."""
    raw = json.dumps(header).encode()
    body = struct.pack("<4sBI", magic, version, len(raw)) + raw + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _header(**changes) -> dict:
    header = {
        "kind": "update",
        "run": RUN,
        "round": 1,
        "model_sha256": SHA,
        "codec": "float32",
        "client_id": "c1",
        "num_examples": 5,
        "metrics": {},
        "tensors": [{"name": "w", "shape": [2], "nbytes": 8, "params": {}}],
    }
    header.update(changes)
    return header


GOOD_PAYLOAD = np.array([1.0, 2.0], "<f4").tobytes()


def _tensor(name="w", shape=(2,), nbytes=8) -> dict:
    return {"name": name, "shape": list(shape), "nbytes": nbytes, "params": {}}


def test_forged_good_frame_decodes():
    frame = decode_frame(_forge(_header(), GOOD_PAYLOAD))
    np.testing.assert_array_equal(frame.tensors[0].array, [1.0, 2.0])
    assert frame.run == RUN


def _without_run() -> dict:
    header = _header()
    del header["run"]
    return header


def test_a_version_1_frame_is_refused_on_the_wire_and_read_only_on_request():
    old = _forge(_without_run(), GOOD_PAYLOAD, version=1)
    with pytest.raises(ProtocolError) as info:
        decode_frame(old)
    assert info.value.reason == "bad_version" and "litefed version" in str(info.value)
    # Old checkpoint files: readable, but they name no run.
    assert decode_frame(old, accept_legacy=True).run == UNNAMED_RUN


def test_the_encoder_refuses_a_bad_run_id():
    with pytest.raises(ProtocolError) as info:
        encode_frame(_frame([np.zeros(2, np.float32)], run="not-a-run"))
    assert info.value.reason == "bad_header"


HOSTILE_RUNS = ["", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "../../etc/passwd", "é" * 16,
                "0123456789abcde\n", 12345, None, True, ["0123456789abcdef"], {"a": 1}, "a" * 10_000]  # fmt: skip


@pytest.mark.parametrize("run", HOSTILE_RUNS, ids=range(len(HOSTILE_RUNS)))
def test_a_hostile_run_id_is_a_bad_header(run):
    with pytest.raises(ProtocolError) as info:
        decode_frame(_forge(_header(run=run), GOOD_PAYLOAD))
    assert info.value.reason == "bad_header"


def test_a_v2_frame_without_a_run_is_a_bad_header():
    with pytest.raises(ProtocolError) as info:
        decode_frame(_forge(_without_run(), GOOD_PAYLOAD))
    assert info.value.reason == "bad_header" and "protocol v1" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (_forge(_header(), GOOD_PAYLOAD, magic=b"XXXX"), "bad_magic"),
        (_forge(_header(), GOOD_PAYLOAD, version=FRAME_VERSION + 1), "bad_version"),
        (_forge(_header(kind="weights"), GOOD_PAYLOAD), "bad_header"),
        (_forge(_header(round=True), GOOD_PAYLOAD), "bad_header"),
        (_forge(_header(round=-1), GOOD_PAYLOAD), "bad_header"),
        (_forge(_header(num_examples="5"), GOOD_PAYLOAD), "bad_header"),
        (_forge(_header(metrics={"loss": "nan"}), GOOD_PAYLOAD), "bad_header"),
        (_forge(_header(codec="pickle"), GOOD_PAYLOAD), "unknown_codec"),
        (_forge(_header(tensors=[_tensor(nbytes=12)]), GOOD_PAYLOAD), "truncated"),
        (_forge(_header(tensors=[_tensor(shape=(3,))]), GOOD_PAYLOAD), "bad_tensor_size"),
        (_forge(_header(tensors=[_tensor(shape=(-2,))]), GOOD_PAYLOAD), "bad_header"),
        (_forge(_header(tensors=[_tensor(name="")]), GOOD_PAYLOAD), "bad_header"),
        (_forge(_header(tensors=[_tensor(shape=(2**40, 2**40))]), GOOD_PAYLOAD), "bad_tensor_size"),
        (_forge(_header(), GOOD_PAYLOAD + b"\x00\x00\x00\x00"), "bad_header"),
        (_forge([1, 2, 3], b""), "bad_header"),
    ],
    ids=[
        "magic", "version", "kind", "bool_round", "negative_round", "string_count", "nan_metric", "unknown_codec",
        "nbytes_past_end", "nbytes_vs_shape", "negative_dim", "empty_name", "huge_shape", "extra_payload", "not_object",
    ],
)  # fmt: skip
def test_each_malformed_header_has_its_reason(raw, reason):
    with pytest.raises(ProtocolError) as info:
        decode_frame(raw)
    assert info.value.reason == reason


SPECS = [TensorSpec("w", (2,), "float32")]


def test_validate_accepts_a_matching_update():
    validate_frame(decode_frame(_forge(_header(), GOOD_PAYLOAD)), SPECS, SHA, "update", current_round=1)


@pytest.mark.parametrize(
    ("frame", "kwargs", "reason"),
    [
        (_frame([np.zeros(2, np.float32)], kind="global"), {}, "wrong_kind"),
        (_frame([np.zeros(2, np.float32)], model_sha256="cd" * 32), {}, "unknown_model"),
        (_frame([np.zeros(2, np.float32)], round=2), {"current_round": 3}, "stale_round"),
        (_frame([np.zeros(2, np.float32)], run=UNNAMED_RUN), {"run": RUN}, "stale_run"),
        (_frame([np.zeros(2, np.float32)], num_examples=0), {}, "bad_header"),
        (_frame([np.array([1.0, np.nan], np.float32)]), {}, "bad_tensors"),
        (_frame([np.array([np.inf, 1.0], np.float32)]), {}, "bad_tensors"),
        (_frame([np.zeros(3, np.float32)]), {}, "bad_tensors"),
        (_frame([np.zeros(2, np.float32), np.zeros(2, np.float32)]), {}, "bad_tensors"),
    ],
    ids=["kind", "model_hash", "stale_round", "stale_run", "no_examples", "nan", "inf", "shape", "extra_tensor"],
)
def test_validate_rejects_what_does_not_fit(frame, kwargs, reason):
    specs = [TensorSpec("layer0/kernel", (2,), "float32")]
    with pytest.raises(ProtocolError) as info:
        validate_frame(frame, specs, SHA, "update", **kwargs)
    assert info.value.reason == reason


# -- the shared tensor checks (edge_client.weights), which validate_frame and the aggregation both use --


def test_validate_accepts_a_dtype_spelled_another_way():
    validate_frame(_frame([np.zeros(2, np.float32)]), [TensorSpec("layer0/kernel", (2,), "<f4")], SHA, "update")


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([np.zeros(2, np.float32), np.zeros(2, np.float32)], "the weight list has 2 tensors, expected 1"),
        ([np.zeros(3, np.float32)], r"tensor 'layer0/kernel': shape \(3,\) != expected \(2,\)"),
        ([np.array([1.0, np.inf], np.float32)], "tensor 'layer0/kernel' contains NaN or Inf"),
    ],
)
def test_validate_says_what_does_not_fit(tensors, message):
    with pytest.raises(ProtocolError, match=message):
        validate_frame(_frame(tensors), [TensorSpec("layer0/kernel", (2,), "float32")], SHA, "update")


def test_layout_checks_read_names_shapes_and_dtypes():
    from edge_client.errors import WeightsError
    from edge_client.weights import check_finite, check_layout, check_weights, layout_of

    weights = [NamedArray("a", np.zeros((2, 3), np.float32)), NamedArray("b", np.arange(4, dtype=np.int32))]
    layout = layout_of(weights)
    assert layout == (TensorSpec("a", (2, 3), "float32"), TensorSpec("b", (4,), "int32"))
    check_weights(weights, layout)  # integer tensors are allowed and need no finiteness check
    with pytest.raises(WeightsError, match="'b' is int32; only floating-point NumPy arrays can be averaged"):
        layout_of(weights, floating=True)
    with pytest.raises(WeightsError, match="'a' is list; only NumPy arrays hold weights"):
        layout_of([NamedArray("a", [1.0, 2.0])])
    with pytest.raises(WeightsError, match=r"repeated: \['a'\]"):
        layout_of([weights[0], weights[0]])
    with pytest.raises(WeightsError, match="expected tensor 'b' at this position, got 'a'; fix it"):
        check_layout(layout[:1] + layout[:1], layout, hint="fix it")
    with pytest.raises(WeightsError, match="dtype float32 != expected float64"):
        check_layout(layout[:1], (TensorSpec("a", (2, 3), "float64"),))
    check_layout(layout[:1], (TensorSpec("a", (2, 3), "float64"),), dtypes=False)
    with pytest.raises(WeightsError, match="'a' contains NaN or Inf; retrain"):
        check_finite([NamedArray("a", np.array([np.nan], np.float64))], hint="retrain")
