"""Lossy tensor codecs: stated error bounds hold, and malformed wire data is only ever a ProtocolError."""

from __future__ import annotations

import contextlib
import math
import struct
import zlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_client.codecs import CODECS, get_codec
from edge_client.error_feedback import ErrorFeedback, decoded_as_sent
from edge_client.errors import ProtocolError, WeightsError
from edge_client.frames import FRAME_VERSION, Frame, decode_frame, encode_frame
from edge_client.messages import UNNAMED_RUN
from edge_client.weights import NamedArray

SHA = "ab" * 32
F32_MAX = float(np.finfo(np.float32).max)

wide_f32 = st.floats(-F32_MAX, F32_MAX, width=32)
small_f32 = st.floats(-1e3, 1e3, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6), elements=wide_f32)
kernels = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6), elements=small_f32)


def _round_trip(codec_name: str, array: np.ndarray) -> tuple[np.ndarray, bytes, dict]:
    codec = get_codec(codec_name)
    blob, params = codec.encode(array)
    decoded = codec.decode(blob, params, array.shape)
    assert decoded.dtype == np.float32 and decoded.shape == array.shape
    return decoded, blob, params


def _float_slack(array: np.ndarray) -> np.ndarray:
    """float32 rounding of a decoded value (plus float64 rounding of the affine map)."""
    return np.abs(array.astype(np.float64)) * 2**-23 + 1e-300


# --- int8 -------------------------------------------------------------------------------------------------------


@given(arrays)
def test_int8_error_is_at_most_half_a_step(array):
    decoded, blob, params = _round_trip("int8", array)
    assert len(blob) == array.size
    assert isinstance(params["scale"], float) and isinstance(params["offset"], float)
    error = np.abs(decoded.astype(np.float64) - array.astype(np.float64))
    assert np.all(error <= params["scale"] / 2 * (1 + 1e-9) + _float_slack(array))


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 4)])
def test_int8_constant_tensors_are_exact(shape):
    array = np.full(shape, -2.75, np.float32)
    decoded, _, params = _round_trip("int8", array)
    assert params["scale"] == 0.0
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("name", ["int8", "int8-channel", "topk:0.1", "topk16:0.1"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 4)])
def test_empty_tensors_round_trip(name, shape):
    decoded, blob, _ = _round_trip(name, np.zeros(shape, np.float32))
    assert blob == b"" and decoded.size == 0


@pytest.mark.parametrize("name", ["int8", "int8-channel", "topk:0.5", "topk16:0.5"])
def test_quantising_codecs_refuse_non_finite_values(name):
    with pytest.raises(ProtocolError) as info:
        get_codec(name).encode(np.array([[1.0, np.nan], [np.inf, 0.0]], np.float32))
    assert info.value.reason == "out_of_range"


# --- int8-channel -----------------------------------------------------------------------------------------------


@given(kernels)
def test_int8_channel_error_is_at_most_half_its_channels_step(array):
    decoded, blob, params = _round_trip("int8-channel", array)
    channels = array.shape[-1]
    assert len(blob) == array.size and len(params["scale"]) == len(params["offset"]) == channels
    error = np.abs(decoded.astype(np.float64) - array.astype(np.float64)).reshape(-1, channels)
    bound = np.array(params["scale"]) / 2 * (1 + 1e-9) + _float_slack(array).reshape(-1, channels)
    assert np.all(error <= bound)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_int8_channel_falls_back_to_one_channel_below_rank_two(shape):
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    decoded, _, params = _round_trip("int8-channel", array)
    assert len(params["scale"]) == 1
    assert np.all(np.abs(decoded - array) <= params["scale"][0] / 2 + 1e-6)


def test_int8_channel_beats_per_tensor_when_channel_ranges_differ():
    rng = np.random.default_rng(2)
    kernel = (rng.normal(size=(3, 3, 8, 16)) * np.logspace(-3, 1, 16)).astype(np.float32)  # Conv [kh, kw, cin, cout]
    per_channel, _, params = _round_trip("int8-channel", kernel)
    per_tensor, _, _ = _round_trip("int8", kernel)
    channel_error = np.abs(per_channel - kernel).reshape(-1, 16).max(axis=0)
    tensor_error = np.abs(per_tensor - kernel).reshape(-1, 16).max(axis=0)
    assert channel_error.max() <= tensor_error.max()
    assert np.all(channel_error[:8] < tensor_error[:8] / 10)  # small channels gain the most
    assert np.all(channel_error <= np.array(params["scale"]) / 2 + 1e-7)


def test_int8_channel_uses_last_axis_of_dense_kernels():
    kernel = np.stack([np.linspace(0, 1, 10), np.linspace(-100, 100, 10)], axis=1).astype(np.float32)  # [in, out]
    _, _, params = _round_trip("int8-channel", kernel)
    np.testing.assert_allclose(params["scale"], [1 / 255, 200 / 255])
    np.testing.assert_allclose(params["offset"], [0.0, -100.0])


# --- top-k ------------------------------------------------------------------------------------------------------

fractions = st.sampled_from(["0.01", "0.1", "0.25", "0.5", "0.999", "1", "1.0", ".3"])


@given(arrays, fractions, st.booleans())
def test_topk_keeps_exactly_the_k_largest_magnitudes(array, fraction, half):
    array = np.clip(array, -6e4, 6e4) if half else array
    name = f"topk16:{fraction}" if half else f"topk:{fraction}"
    decoded, blob, params = _round_trip(name, array)
    size = array.size
    k = 0 if size == 0 else min(size, max(1, math.ceil(Fraction(fraction) * size)))
    assert params == {"k": k}
    assert len(blob) == k * (6 if half else 8)
    indices = np.frombuffer(blob, "<u4", count=k)
    assert np.all(np.diff(indices.astype(np.int64)) > 0)
    flat, got = array.reshape(-1), decoded.reshape(-1)
    dropped = np.ones(size, bool)
    dropped[indices] = False
    assert np.all(got[dropped] == 0)
    if half:
        np.testing.assert_allclose(got[indices], flat[indices], rtol=2**-10, atol=6.2e-5)
    else:
        np.testing.assert_array_equal(got[indices], flat[indices])
    if k and dropped.any():
        assert np.abs(flat[indices]).min() >= np.abs(flat[dropped]).max()


def test_topk_uses_exact_decimal_fractions():
    # 0.01 * 300 is 3.0000000000000004 in binary floating point; k must still be 3.
    _, _, params = _round_trip("topk:0.01", np.arange(300, dtype=np.float32))
    assert params["k"] == 3


def test_topk_of_a_million_values_sends_one_percent_of_eight_bytes():
    array = np.random.default_rng(3).normal(size=1_000_000).astype(np.float32)
    codec = get_codec("topk:0.01")
    blob, params = codec.encode(array)
    assert params == {"k": 10_000} and len(blob) == 10_000 * 8  # 2 % of the 4 MB float32 payload
    frame = Frame("update", 1, SHA, [NamedArray("w", array)], codec="topk:0.01", num_examples=1)
    assert len(encode_frame(frame)) < 0.0201 * array.nbytes + 512


@pytest.mark.parametrize("name", ["topk:0.05", "topk:1", "topk:.5", "topk:0.000001", "topk16:0.2", "topk:1.000"])
def test_get_codec_parses_any_fraction_in_range(name):
    assert get_codec(name).name == name


@pytest.mark.parametrize(
    "name",
    ["topk:0", "topk:0.0", "topk:2", "topk:1.01", "topk:x", "topk:", "topk", "topk:-0.1", "topk:nan", "topk:inf",
     "topk:1e-3", "topk:1/3", "topk: 0.1", "topk:0.1 ", "topk:0." + "1" * 40, "topk8:0.1", "int4", "", None, 3],
)  # fmt: skip
def test_get_codec_rejects_bad_names(name):
    with pytest.raises(ProtocolError) as info:
        get_codec(name)
    assert info.value.reason == "unknown_codec"


def test_registry_keeps_the_raw_codecs():
    assert {"float32", "float16", "int8", "int8-channel"} <= set(CODECS)
    blob, params = get_codec("float16").encode(np.array([1.5], np.float32))
    assert (blob, params) == (np.array([1.5], "<f2").tobytes(), {})


# --- frames -----------------------------------------------------------------------------------------------------

LOSSY = ["int8", "int8-channel", "topk:0.3", "topk16:0.3"]


@settings(max_examples=40)
@given(st.lists(arrays.map(lambda a: np.clip(a, -6e4, 6e4)), min_size=1, max_size=4), st.sampled_from(LOSSY))
def test_frames_with_lossy_codecs_round_trip(tensors, name):
    named = [NamedArray(f"layer{i}/kernel", a) for i, a in enumerate(tensors)]
    frame = Frame("update", 4, SHA, named, codec=name, client_id="pi-1", num_examples=9)
    back = decode_frame(encode_frame(frame))
    assert back.codec == name and [t.name for t in back.tensors] == [t.name for t in named]
    codec = get_codec(name)
    for got, sent in zip(back.tensors, named, strict=True):
        blob, params = codec.encode(sent.array)
        np.testing.assert_array_equal(got.array, codec.decode(blob, params, sent.array.shape))


# --- malformed wire data ----------------------------------------------------------------------------------------

U8 = bytes(range(6))


def _topk_blob(indices, values) -> bytes:
    return np.array(indices, "<u4").tobytes() + np.array(values, "<f4").tobytes()


@pytest.mark.parametrize(
    ("name", "blob", "params", "shape", "reason"),
    [
        ("int8", U8, {"scale": 0.1, "offset": 0.0}, (2, 3), None),
        ("int8", U8[:5], {"scale": 0.1, "offset": 0.0}, (2, 3), "bad_tensor_size"),
        ("int8", U8 + b"\0", {"scale": 0.1, "offset": 0.0}, (2, 3), "bad_tensor_size"),
        ("int8", b"", {"scale": 0.1, "offset": 0.0}, (0, 2**62), "bad_tensor_size"),
        ("int8", U8, {"scale": "0.1", "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": True, "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": None, "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": [0.1], "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": math.nan, "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": math.inf, "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": -0.1, "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": 0.1, "offset": math.nan}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": 10**400, "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": 1e37, "offset": 0.0}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": 0.1, "offset": -1e39}, (6,), "bad_codec_params"),
        ("int8", U8, {"scale": 0.1}, (6,), "bad_codec_params"),
        ("int8", U8, {}, (6,), "bad_codec_params"),
        ("int8", U8, [0.1, 0.0], (6,), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1] * 3, "offset": [0.0] * 3}, (2, 3), None),
        ("int8-channel", U8, {"scale": [0.1] * 2, "offset": [0.0] * 3}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1] * 3, "offset": [0.0] * 4}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1] * 6, "offset": [0.0] * 6}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": 0.1, "offset": 0.0}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1, -1, 0.1], "offset": [0.0] * 3}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1, math.nan, 0.1], "offset": [0.0] * 3}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1, "x", 0.1], "offset": [0.0] * 3}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1] * 3, "offset": [0.0, None, 0.0]}, (2, 3), "bad_codec_params"),
        ("int8-channel", U8, {"scale": [0.1], "offset": [0.0]}, (6,), None),
        ("int8-channel", U8, {"scale": [0.1] * 6, "offset": [0.0] * 6}, (6,), "bad_codec_params"),
        ("int8-channel", U8[:4], {"scale": [0.1] * 3, "offset": [0.0] * 3}, (2, 3), "bad_tensor_size"),
        ("topk:0.5", _topk_blob([1, 4], [1, 2]), {"k": 2}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2]), {"k": 2}, (4,), None),
        ("topk:0.5", _topk_blob([3, 1], [1, 2]), {"k": 2}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 1], [1, 2]), {"k": 2}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 2**32 - 1], [1, 2]), {"k": 2}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2])[:-1], {"k": 2}, (4,), "bad_tensor_size"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2]) + b"\0", {"k": 2}, (4,), "bad_tensor_size"),
        ("topk:0.5", _topk_blob([1], [1]), {"k": 1}, (4,), "bad_codec_params"),
        ("topk:1", _topk_blob(range(5), range(5)), {"k": 5}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2]), {"k": -2}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2]), {"k": 2.0}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2]), {"k": "2"}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2]), {"k": True}, (4,), "bad_codec_params"),
        ("topk:0.5", _topk_blob([1, 3], [1, 2]), {}, (4,), "bad_codec_params"),
        ("topk:0.000001", _topk_blob([1], [1]), {"k": 1}, (2**16, 2**16), "bad_tensor_size"),
        ("topk16:0.5", _topk_blob([1, 3], [1, 2]), {"k": 2}, (4,), "bad_tensor_size"),
        ("float32", b"", {}, (0, 2**63), "bad_tensor_size"),
    ],
)
def test_each_malformed_input_has_its_reason(name, blob, params, shape, reason):
    codec = get_codec(name)
    if reason is None:
        assert codec.decode(blob, params, shape).shape == shape
        return
    with pytest.raises(ProtocolError) as info:
        codec.decode(blob, params, shape)
    assert info.value.reason == reason


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=6)
numbers = st.floats() | st.integers(-(2**70), 2**70)
param_dicts = st.dictionaries(st.sampled_from(["scale", "offset", "k", "x"]), json_values, max_size=4) | (
    st.fixed_dictionaries(
        {"scale": numbers | st.lists(numbers, max_size=9), "offset": numbers | st.lists(numbers, max_size=9)}
    )
    | st.fixed_dictionaries({"k": st.integers(-2, 12)})
)
shapes = st.lists(st.integers(0, 8) | st.sampled_from([2**31, 2**62, 2**64]), max_size=4).map(tuple)
all_names = st.sampled_from(["float32", "float16", "int8", "int8-channel", "topk:0.5", "topk:1", "topk16:0.25"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(all_names, st.binary(max_size=80), param_dicts, shapes)
def test_random_wire_data_never_raises_anything_but_protocol_error(name, blob, params, shape):
    try:
        decoded = get_codec(name).decode(blob, params, shape)
    except ProtocolError as exc:
        assert exc.reason in {"bad_tensor_size", "bad_codec_params"}
    else:
        assert decoded.dtype == np.float32 and decoded.shape == shape


@settings(max_examples=150)
@given(all_names, kernels, st.data())
def test_valid_params_with_one_field_mutated_is_still_only_protocol_error(name, array, data):
    codec = get_codec(name)
    blob, params = codec.encode(np.clip(array, -6e4, 6e4))
    key = data.draw(st.sampled_from([*params, "scale"]))
    params = {**params, key: data.draw(json_values)}
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    with contextlib.suppress(ProtocolError):
        codec.decode(blob, params, array.shape)


# --- error feedback ---------------------------------------------------------------------------------------------


def _weights(rng, scale=1.0):
    return [
        NamedArray("dense/kernel", (rng.normal(size=(20, 10)) * scale).astype(np.float32)),
        NamedArray("dense/bias", (rng.normal(size=(10,)) * scale).astype(np.float32)),
    ]


@pytest.mark.parametrize("name", ["topk:0.05", "topk:0.2", "int8"])
def test_error_feedback_sum_of_sent_tracks_sum_of_intended(name):
    rng, codec, ef = np.random.default_rng(4), get_codec(name), ErrorFeedback()
    intended_sum = {"dense/kernel": np.zeros((20, 10)), "dense/bias": np.zeros(10)}
    sent_sum = {key: np.zeros_like(value) for key, value in intended_sum.items()}
    for _ in range(6):
        delta = _weights(rng)
        adjusted = ef.adjust(delta)
        sent = decoded_as_sent(adjusted, codec)
        ef.update(adjusted, sent)
        for (key, d), (_, s) in zip(delta, sent, strict=True):
            intended_sum[key] += d
            sent_sum[key] += s
        for key in intended_sum:  # sum(sent) = sum(intended) - residual, every round
            np.testing.assert_allclose(sent_sum[key] + ef.residual(key), intended_sum[key], atol=1e-4)


def test_error_feedback_lets_top_k_deliver_everything_eventually():
    codec, delta = get_codec("topk:0.1"), _weights(np.random.default_rng(5), scale=0.01)
    gaps = {}
    for use_feedback in (False, True):
        ef, sent_sum = ErrorFeedback(), [np.zeros(a.shape) for _, a in delta]
        for _ in range(200):
            adjusted = ef.adjust(delta) if use_feedback else delta
            sent = decoded_as_sent(adjusted, codec)
            if use_feedback:
                ef.update(adjusted, sent)
            for total, (_, s) in zip(sent_sum, sent, strict=True):
                total += s
        intended = [200 * a.astype(np.float64) for _, a in delta]
        gaps[use_feedback] = max(
            float(np.abs(t - i).max() / np.abs(i).max()) for t, i in zip(sent_sum, intended, strict=True)
        )
    assert gaps[False] > 0.5  # without feedback small coordinates are never sent
    assert gaps[True] < 0.1  # with feedback the residual stays bounded while the sums grow


def test_error_feedback_state_round_trips_and_resets():
    rng, codec, ef = np.random.default_rng(6), get_codec("topk:0.1"), ErrorFeedback()
    adjusted = ef.adjust(_weights(rng))
    ef.update(adjusted, decoded_as_sent(adjusted, codec))
    state = ef.state_dict()
    assert set(state) == {"dense/kernel", "dense/bias"} and all(v.dtype == np.float32 for v in state.values())
    restored = ErrorFeedback()
    restored.load_state_dict(state)
    delta = _weights(rng)
    for a, b in zip(ef.adjust(delta), restored.adjust(delta), strict=True):
        np.testing.assert_array_equal(a.array, b.array)
    ef.reset()
    assert ef.state_dict() == {}
    np.testing.assert_array_equal(ef.adjust(delta)[0].array, delta[0].array)


@pytest.mark.parametrize(
    "state",
    [{"w": np.array([np.nan], np.float32)}, {"": np.zeros(2)}, {3: np.zeros(2)}, {"w": np.array(["a"])}],
)
def test_error_feedback_rejects_bad_state(state):
    with pytest.raises(WeightsError):
        ErrorFeedback().load_state_dict(state)


def test_error_feedback_refuses_a_residual_of_another_shape():
    ef = ErrorFeedback()
    ef.load_state_dict({"w": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="reset"):
        ef.adjust([NamedArray("w", np.zeros(4, np.float32))])
    with pytest.raises(WeightsError):
        ef.update([NamedArray("w", np.zeros(4, np.float32))], [NamedArray("v", np.zeros(4, np.float32))])


def _forged_frame(codec: str, params_json: str, payload: bytes, shape=(2, 3)) -> bytes:
    tensor = f'{{"name":"w","shape":{list(shape)},"nbytes":{len(payload)},"params":{params_json}}}'
    header = (
        f'{{"kind":"update","round":1,"model_sha256":"{SHA}","codec":"{codec}","client_id":"c",'
        f'"num_examples":1,"metrics":{{}},"run":"{UNNAMED_RUN}","tensors":[{tensor}]}}'
    ).encode()
    body = struct.pack("<4sBI", b"LFWT", FRAME_VERSION, len(header)) + header + payload
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize(
    ("codec", "params_json", "payload", "reason"),
    [
        ("int8", '{"scale":0.5,"offset":-1.0}', U8, None),
        # NaN and Infinity are not JSON: the header's decoder refuses them before any codec sees them.
        ("int8", '{"scale":NaN,"offset":-1.0}', U8, "bad_header"),
        ("int8", '{"scale":Infinity,"offset":-1.0}', U8, "bad_header"),
        ("int8", '{"scale":1e999,"offset":-1.0}', U8, "bad_header"),
        ("int8", '{"scale":-0.5,"offset":-1.0}', U8, "bad_codec_params"),
        ("int8-channel", '{"scale":[0.5,0.5],"offset":[0,0]}', U8, "bad_codec_params"),
        ("topk:0.5", '{"k":3}', _topk_blob([0, 2, 5], [1, 2, 3]), None),
        ("topk:0.5", '{"k":3}', _topk_blob([0, 6, 5], [1, 2, 3]), "bad_codec_params"),
        ("topk:0.5", '{"k":3}', _topk_blob([0, 2, 5], [1, 2, 3])[:-4], "bad_tensor_size"),
        ("topk:0", '{"k":3}', _topk_blob([0, 2, 5], [1, 2, 3]), "unknown_codec"),
    ],
)
def test_forged_frames_with_lossy_codecs(codec, params_json, payload, reason):
    raw = _forged_frame(codec, params_json, payload)
    if reason is None:
        assert decode_frame(raw).tensors[0].array.shape == (2, 3)
        return
    with pytest.raises(ProtocolError) as info:
        decode_frame(raw)
    assert info.value.reason == reason
