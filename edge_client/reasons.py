"""Why a message was refused: the protocol's rejection reasons, each listed once.

A reason is a short stable code carried by :class:`~edge_client.errors.ProtocolError`,
sent back to a board in a rejected ``Ack``, and counted per round in the
coordinator's ``metrics.jsonl`` (``rejected_reasons``). Operators build
dashboards and alerts on these strings, so they are an API: add new ones
here (and to the table in docs/protocol.md, which a test compares with
:data:`REASONS`), never rename one.
"""

from __future__ import annotations

# -- framing: the bytes are not a well-formed litefed frame, chunk or message --------------
TRUNCATED = "truncated"  # shorter than its fixed fields, or a length points past the end
BAD_MAGIC = "bad_magic"  # not a litefed frame or chunk
BAD_VERSION = "bad_version"  # another protocol version
BAD_CHECKSUM = "bad_checksum"  # CRC-32 mismatch
BAD_HEADER = "bad_header"  # malformed frame header
BAD_JSON = "bad_json"  # malformed control message: not JSON, wrong field type or value
BAD_SHA256 = "bad_sha256"  # a SHA-256 field is not 64 lowercase hex digits

# -- codecs ----------------------------------------------------------------------------------
UNKNOWN_CODEC = "unknown_codec"
BAD_TENSOR_SIZE = "bad_tensor_size"  # blob size does not match the tensor's shape
BAD_CODEC_PARAMS = "bad_codec_params"  # malformed per-tensor codec parameters
OUT_OF_RANGE = "out_of_range"  # values the codec cannot represent

# -- chunks and memory -------------------------------------------------------------------------
BAD_CHUNK = "bad_chunk"  # chunks of one payload disagree (count, index, length)
TOO_LARGE = "too_large"  # a payload beyond the size limit
TOO_BUSY = "too_busy"  # too many payloads being reassembled at once

# -- the federation: a well-formed message that does not fit -----------------------------------
WRONG_KIND = "wrong_kind"  # a global frame where an update was expected, or the reverse
UNKNOWN_MODEL = "unknown_model"  # the frame's model_sha256 is not the federation's model
STALE_ROUND = "stale_round"  # for another round (late or early)
STALE_RUN = "stale_run"  # for another run than the coordinator's
BAD_TENSORS = "bad_tensors"  # names, order, shapes or dtypes differ from the manifest, or NaN/Inf
SIZE_MISMATCH = "size_mismatch"  # model bytes whose size differs from what the model meta announced
MANIFEST_MISMATCH = "manifest_mismatch"  # a model meta whose manifest belongs to another model
BAD_MODEL = "bad_model"  # the downloaded model cannot be loaded by LiteRT

# -- the coordinator's own decisions -------------------------------------------------------------
NOT_SELECTED = "not_selected"  # the client was not selected for this round
CLIENT_MISMATCH = "client_mismatch"  # the frame's client_id differs from its topic's
DUPLICATE = "duplicate"  # already accepted this round: an ack status, not a rejection

# -- signatures (issue 11): boards trust only what the coordinator signed -------------------------
UNSIGNED = "unsigned"  # not a signed envelope, or an unknown envelope version
UNKNOWN_KEY = "unknown_key"  # signed by a key this board does not trust
BAD_SIGNATURE = "bad_signature"  # tampered or forged
REPLAYED = "replayed"  # signed, but older than the newest message of its kind the board accepted

# -- simulator metrics: a virtual client that sent nothing ---------------------------------------
DIVERGED = "diverged"  # local training produced NaN/Inf
NO_UPDATE = "no_update"  # no update, for no more specific reason

# -- hostile input (issue 11, part R): an update that does not fit what was asked or reported --
TOO_MANY_EXAMPLES = "too_many_examples"  # num_examples above the client's presence or the coordinator's cap
WRONG_CODEC = "wrong_codec"  # the update's codec is not the one its round announced
NORM_TOO_LARGE = "norm_too_large"  # the update's L2 norm exceeds the coordinator's --max-update-norm

REASONS: tuple[str, ...] = (
    TRUNCATED,
    BAD_MAGIC,
    BAD_VERSION,
    BAD_CHECKSUM,
    BAD_HEADER,
    BAD_JSON,
    BAD_SHA256,
    UNKNOWN_CODEC,
    BAD_TENSOR_SIZE,
    BAD_CODEC_PARAMS,
    OUT_OF_RANGE,
    BAD_CHUNK,
    TOO_LARGE,
    TOO_BUSY,
    WRONG_KIND,
    UNKNOWN_MODEL,
    STALE_ROUND,
    STALE_RUN,
    BAD_TENSORS,
    SIZE_MISMATCH,
    MANIFEST_MISMATCH,
    BAD_MODEL,
    NOT_SELECTED,
    CLIENT_MISMATCH,
    DUPLICATE,
    UNSIGNED,
    UNKNOWN_KEY,
    BAD_SIGNATURE,
    REPLAYED,
    DIVERGED,
    NO_UPDATE,
    # hostile input (part R)
    TOO_MANY_EXAMPLES,
    WRONG_CODEC,
    NORM_TOO_LARGE,
)
"""Every reason, in the order of the table in docs/protocol.md."""
