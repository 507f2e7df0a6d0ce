"""Fuzz the wire decoders: every input must decode or raise ProtocolError, nothing else.

    python scripts/fuzz_decoders.py [--inputs 100000] [--seed 0]

A mutation fuzzer, deterministic for a seed. It starts from valid inputs
(update and global frames with every codec, their MQTT chunks, every control
message, signed envelopes) and mutates them: bit flips, byte changes,
truncations, insertions, boundary integers, duplicated or reordered chunks,
JSON values replaced by hostile ones (deep nesting, huge integers, NaN,
wrong types), random bytes. Most frame and chunk mutations get their CRC-32
fixed afterwards (anyone can compute one), so the checks behind the checksum
are fuzzed too: header fields, lengths, codec parameters, tensor sizes. Each input goes to the decoder of its kind:
``decode_frame`` then ``validate_frame``, ``Reassembler.add``, the message
types' ``from_bytes``, ``loads_bounded`` and ``TrustKey.open``. Anything but a
:class:`ProtocolError` escaping is a finding: printed with the input (hex) and
the run exits 1. The summary counts inputs per decoder, accepted and rejected
ones, and rejections per reason.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np

from edge_client.chunks import HEADER_SIZE as CHUNK_HEADER
from edge_client.chunks import Reassembler, split
from edge_client.codecs import CODECS
from edge_client.errors import ProtocolError
from edge_client.frames import Frame, decode_frame, encode_frame, validate_frame
from edge_client.messages import Ack, ModelMeta, Presence, RoundAnnouncement
from edge_client.reasons import BAD_JSON
from edge_client.signing import SigningKey
from edge_client.trust import Verifier
from edge_client.weights import NamedArray, TensorSpec
from edge_client.wire_json import loads_bounded

RUN = "0123456789abcdef"
SHA = "ab" * 32
SPECS = (TensorSpec("dense/kernel", (6, 4), "float32"), TensorSpec("dense/bias", (4,), "float32"))
KEY = SigningKey.generate()
VERIFIER = Verifier(KEY.trust_key)  # in memory: the replay rule without a state directory
CHUNK = 256  # small chunks: a frame is several, so their cross-checks are exercised
_CHUNK_SEP = b"\n--chunk--\n"  # a chunk-list input is its chunks joined by this; mutations may hit it too
HOSTILE_JSON = ["[" * 5000 + "]" * 5000, "9" * 5000, "1e999", "NaN", "-Infinity", "true", "null", '"x"', "[]", "{}"]


@dataclass
class Report:
    """What a fuzz run saw, per decoder."""

    inputs: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: collections.Counter[str] = field(default_factory=collections.Counter)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.inputs.values())


def _weights(rng: random.Random) -> list[NamedArray]:
    gen = np.random.default_rng(rng.randrange(1 << 30))
    return [NamedArray(s.name, gen.normal(size=s.shape).astype(np.float32)) for s in SPECS]


def seeds(rng: random.Random) -> dict[str, list[bytes]]:
    """Valid inputs of every kind, the fuzzer's starting points."""
    frames = []
    for codec in [*sorted(CODECS), "topk:0.25", "topk16:0.5"]:
        update = Frame("update", 3, SHA, _weights(rng), codec, client_id="pi-1", num_examples=32, run=RUN)
        frames.append(encode_frame(update))
    frames.append(encode_frame(Frame("global", 3, SHA, _weights(rng), run=RUN)))
    manifest = json.dumps({"format_version": 2, "model_sha256": SHA})
    messages = [
        RoundAnnouncement(3, ("pi-1", "pi-2"), 1.7e9, SHA, 1, 0.05, 0.0, "float32", RUN).to_bytes(),
        Ack(3, "accepted", "", RUN).to_bytes(),
        Presence("online", 32, "0.1.0").to_bytes(),
        b'{"status": "offline"}',
        ModelMeta(SHA, 1000, 1, manifest).to_bytes(),
    ]
    return {
        "frame": frames,
        "chunks": [_CHUNK_SEP.join(split(f, CHUNK)) for f in frames[:3]],  # see _decode_chunks
        "message": messages,
        "envelope": [KEY.seal("round", m) for m in messages[:1]] + [KEY.seal("global", frames[-1])],
    }


def mutate(data: bytes, rng: random.Random, json_only: bool = False) -> bytes:
    """One random mutation of ``data`` (sometimes several); ``json_only``: hostile JSON values only."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = 7 if json_only else rng.randrange(9)
        pos = rng.randrange(len(out) + 1) if out else 0
        if op == 0 and out:  # flip a bit
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and out:  # set a byte to a boundary value
            out[min(pos, len(out) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2:  # truncate
            del out[pos:]
        elif op == 3:  # insert random bytes
            out[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif op == 4 and out:  # delete a run
            del out[pos : pos + rng.randrange(1, 64)]
        elif op == 5:  # duplicate a run
            out[pos:pos] = out[pos : pos + rng.randrange(1, 64)]
        elif op == 6:  # little-endian integer at a position: lengths and counts live in these
            value = rng.choice((0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1))
            out[pos : pos + 8] = value.to_bytes(8, "little")
        elif op == 7:  # a JSON value swapped for a hostile one
            text = bytes(out).decode("utf-8", "replace")
            spots = [i for i, c in enumerate(text) if c in ":,["]
            if spots:
                i = rng.choice(spots) + 1
                j = i + rng.randrange(0, 12)
                out = bytearray((text[:i] + rng.choice(HOSTILE_JSON) + text[j:]).encode())
        else:  # random bytes of about the same size
            out = bytearray(rng.randbytes(max(1, len(out) + rng.randrange(-8, 9))))
    return bytes(out)


def fix_frame_crc(data: bytes) -> bytes:
    """``data`` with its trailing CRC-32 made right again, as an attacker would: the checks behind it get fuzzed."""
    return data[:-4] + zlib.crc32(data[:-4]).to_bytes(4, "little") if len(data) > 4 else data


def fix_chunk_crc(chunk: bytes) -> bytes:
    if len(chunk) < CHUNK_HEADER:
        return chunk
    crc = zlib.crc32(chunk[CHUNK_HEADER:]).to_bytes(4, "little")
    return chunk[: CHUNK_HEADER - 4] + crc + chunk[CHUNK_HEADER:]


def mutate_frame_header(data: bytes, rng: random.Random) -> bytes:
    """Mutate a frame's JSON header only, then fix its length field and the CRC."""
    if len(data) < 9 + 4:
        return data
    length = int.from_bytes(data[5:9], "little")
    header, rest = data[9 : 9 + length], data[9 + length :]
    header = mutate(header, rng, json_only=True)
    return fix_frame_crc(data[:5] + len(header).to_bytes(4, "little") + header + rest)


def _decode_frame(data: bytes) -> None:
    frame = decode_frame(data)
    validate_frame(frame, SPECS, SHA, frame.kind, current_round=frame.round, run=frame.run)


def _decode_message(data: bytes) -> None:
    """Every control message type's decoder; the input counts as decoded if one of them takes it."""
    loads_bounded(data, "message", BAD_JSON)
    error: ProtocolError | None = None
    for kind in (RoundAnnouncement, Ack, Presence, ModelMeta):
        try:
            kind.from_bytes(data)
            return
        except ProtocolError as exc:
            error = exc
    assert error is not None
    raise error


def _decode_chunks(data: bytes, reassembler: Reassembler) -> None:
    """Feed the chunks of ``data`` to one long-lived reassembler (so leftovers of earlier inputs stay in play)."""
    chunks = data.split(_CHUNK_SEP)
    for i, chunk in enumerate(chunks):
        try:
            result = reassembler.add(chunk, source="fuzz")
        except ProtocolError:
            if i < len(chunks) - 1:
                continue  # one bad chunk; the rest of the transfer still arrives
            raise
        if result is not None:
            _decode_frame(result)


_BODY_DECODERS: dict[str, Callable[[bytes], object]] = {
    "round": RoundAnnouncement.from_bytes,
    "global": decode_frame,
    "model_meta": ModelMeta.from_bytes,
}


def _decode_envelope(data: bytes) -> None:
    """What a board does with a signed message: the verifier (replay rule included), then the body's decoder."""
    error: ProtocolError | None = None
    for kind, decode in _BODY_DECODERS.items():
        try:
            decode(VERIFIER.open(kind, data))
            return
        except ProtocolError as exc:
            error = exc
    assert error is not None
    raise error


def fuzz(inputs: int, seed: int = 0, progress: Callable[[int], None] | None = None) -> Report:
    """Run ``inputs`` mutated inputs through the decoders; a :class:`Report` (findings included)."""
    rng = random.Random(seed)
    starts = seeds(rng)
    reassembler = Reassembler(max_payload=1 << 20, max_pending=8 << 20)
    decoders: dict[str, Callable[[bytes], None]] = {
        "frame": _decode_frame,
        "chunks": lambda d: _decode_chunks(d, reassembler),
        "message": _decode_message,
        "envelope": _decode_envelope,
    }
    report, started = Report(), time.perf_counter()
    for n, (kind, data) in enumerate(_inputs(starts, inputs, rng)):
        report.inputs[kind] += 1
        try:
            decoders[kind](data)
            report.accepted[kind] += 1
        except ProtocolError as exc:
            report.reasons[exc.reason] += 1
        except Exception:  # a finding: anything but the protocol's error
            report.findings.append(f"{kind} input {data[:2000].hex()}\n{traceback.format_exc()}")
        if progress is not None and n % 10_000 == 0:
            progress(n)
    report.seconds = time.perf_counter() - started
    return report


def _inputs(starts: dict[str, list[bytes]], count: int, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    kinds = sorted(starts)
    for _ in range(count):
        kind = rng.choice(kinds)
        seed = rng.choice(starts[kind])
        if kind == "frame" and rng.random() < 0.4:
            yield kind, mutate_frame_header(seed, rng)
        elif kind == "frame" and rng.random() < 0.6:
            yield kind, fix_frame_crc(mutate(seed, rng))  # past the checksum, into lengths and tensors
        elif kind == "chunks" and rng.random() < 0.7:
            chunks = seed.split(_CHUNK_SEP)
            i = rng.randrange(len(chunks))
            chunks[i] = fix_chunk_crc(mutate(chunks[i], rng))
            if rng.random() < 0.3:
                rng.shuffle(chunks)  # out of order, and sometimes one twice
                chunks.append(rng.choice(chunks))
            yield kind, _CHUNK_SEP.join(chunks)
        else:
            yield kind, mutate(seed, rng)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fuzz_decoders.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--inputs", type=int, default=100_000, help="how many mutated inputs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (default %(default)s)")
    args = p.parse_args(argv)
    report = fuzz(args.inputs, args.seed, progress=lambda n: print(f"  {n:,} inputs", file=sys.stderr))
    print(f"{report.total:,} inputs in {report.seconds:.1f} s ({report.total / report.seconds:,.0f}/s), "
          f"seed {args.seed}; findings: {len(report.findings)}")  # fmt: skip
    for kind in sorted(report.inputs):
        print(f"  {kind:9} {report.inputs[kind]:7,} inputs, {report.accepted[kind]:6,} decoded")
    print("  rejections by reason: " + ", ".join(f"{r} {c:,}" for r, c in report.reasons.most_common()))
    for finding in report.findings[:5]:
        print(finding, file=sys.stderr)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
