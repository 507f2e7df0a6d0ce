"""Chunking: any order, any duplication, bounded memory, and clear rejections."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_client.chunks import DEFAULT_MAX_CHUNK, HEADER_SIZE, Reassembler, parse_chunk, split
from edge_client.errors import ProtocolError


@given(st.binary(max_size=5000), st.integers(HEADER_SIZE + 1, 700), st.randoms(use_true_random=False), st.data())
def test_reassembles_under_shuffling_and_duplicates(payload, max_chunk, rnd, data):
    chunks = split(payload, max_chunk)
    assert all(len(c) <= max_chunk for c in chunks)
    # Deliver every chunk at least once, some several times, in a random order.
    deliveries = chunks + data.draw(st.lists(st.sampled_from(chunks), max_size=len(chunks)))
    rnd.shuffle(deliveries)
    assembler = Reassembler()
    results = [r for r in (assembler.add(c, "t") for c in deliveries) if r is not None]
    # Duplicates delivered after completion may complete it again, never anything else.
    assert results and all(r == payload for r in results)


def test_default_chunks_fit_aws_iot_core_limit():
    chunks = split(bytes(1_000_000))
    assert max(len(c) for c in chunks) <= DEFAULT_MAX_CHUNK < 128 * 1024


def test_empty_payload_is_one_chunk():
    chunks = split(b"")
    assert len(chunks) == 1 and Reassembler().add(chunks[0]) == b""


def test_sources_and_transfers_are_kept_apart():
    a, b = split(b"a" * 300, 100), split(b"b" * 300, 100)
    assembler = Reassembler()
    assert assembler.add(a[0], "x") is None and assembler.add(b[0], "x") is None
    assert assembler.add(a[0], "y") is None  # same transfer from another source
    assert assembler.pending_transfers == 3
    for c in a[1:]:
        out = assembler.add(c, "x")
    assert out == b"a" * 300


def test_resend_of_a_completed_payload_completes_again():
    """A client that missed its ack resends; the receiver must see the payload again to re-ack."""
    chunks, assembler = split(b"z" * 250, 100), Reassembler()
    assert [assembler.add(c) for c in chunks][-1] == b"z" * 250
    assert [assembler.add(c) for c in chunks][-1] == b"z" * 250


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda c: b"XXXX" + c[4:], "bad_magic"),
        (lambda c: c[:4] + b"\x09" + c[5:], "bad_version"),
        (lambda c: c[:10], "truncated"),
        (lambda c: c[:-1] + bytes([c[-1] ^ 1]), "bad_checksum"),
    ],
    ids=["magic", "version", "truncated", "checksum"],
)
def test_bad_chunks_have_their_reason(mutate, reason):
    with pytest.raises(ProtocolError) as info:
        parse_chunk(mutate(split(b"hello world" * 10, 64)[0]))
    assert info.value.reason == reason


def test_conflicting_duplicate_is_refused():
    first = split(b"A" * 200, 100, transfer_id=b"\x01" * 16)
    other = split(b"B" * 200, 100, transfer_id=b"\x01" * 16)
    assembler = Reassembler()
    assembler.add(first[0])
    with pytest.raises(ProtocolError, match="different data"):
        assembler.add(other[0])


def test_inconsistent_count_is_refused():
    a = split(b"A" * 200, 100, transfer_id=b"\x02" * 16)
    b = split(b"A" * 500, 100, transfer_id=b"\x02" * 16)
    assembler = Reassembler()
    assembler.add(a[0])
    with pytest.raises(ProtocolError) as info:
        assembler.add(b[1])
    assert info.value.reason == "bad_chunk"


def test_payload_size_limit():
    with pytest.raises(ProtocolError) as info:
        Reassembler(max_payload=1000).add(split(bytes(5000), 500)[0])
    assert info.value.reason == "too_large"


def test_pending_memory_is_bounded_and_nothing_is_kept_for_a_refused_chunk():
    assembler = Reassembler(max_pending=250)
    assembler.add(split(b"a" * 1000, 200)[0], "one")
    with pytest.raises(ProtocolError) as info:
        assembler.add(split(b"b" * 1000, 200)[0], "two")
    assert info.value.reason == "too_busy"
    assert assembler.pending_transfers == 1 and assembler.pending_bytes == 200 - HEADER_SIZE


def test_incomplete_transfers_expire():
    now = [0.0]
    assembler = Reassembler(ttl=10, clock=lambda: now[0])
    chunks = split(b"x" * 500, 100)
    assembler.add(chunks[0], "slow")
    now[0] = 11.0
    assembler.add(split(b"other", 100)[0], "fresh")  # any arrival sweeps stale transfers
    assert assembler.expired == 1 and assembler.pending_transfers == 0 and assembler.pending_bytes == 0


def test_split_rejects_a_chunk_size_that_cannot_hold_data():
    with pytest.raises(ValueError, match="header"):
        split(b"abc", HEADER_SIZE)


# -- one source cannot take the others' share (issue 11) ------------------------------------


def test_a_flooding_source_is_refused_while_honest_sources_complete_their_updates():
    assembler = Reassembler(max_payload=4000, max_pending=20_000)  # per source: two payloads, 8,000 bytes
    honest = {name: bytes([i]) * 3000 for i, name in enumerate(("update/pi-1", "update/pi-2"))}
    pieces = {name: split(payload, 500) for name, payload in honest.items()}
    refused, done = 0, {}
    for n in range(200):  # junk: valid chunks of transfers that never complete, each a new transfer id
        junk = split(n.to_bytes(4, "little") * 1000, 1000)[0]
        try:
            assembler.add(junk, "update/mallory")
        except ProtocolError as exc:
            assert exc.reason == "too_busy"
            refused += 1
        for name, chunks in pieces.items():  # honest chunks interleaved with the flood
            if n < len(chunks) and (payload := assembler.add(chunks[n], name)) is not None:
                done[name] = payload
    assert done == honest
    assert refused > 150 and assembler.pending_of("update/mallory") <= 8000
    assert assembler.pending_of("update/pi-1") == assembler.pending_of("update/pi-2") == 0


def test_honest_chunks_are_never_evicted_and_the_total_bound_still_holds():
    assembler = Reassembler(max_payload=4000, max_pending=10_000, max_pending_per_source=6000)
    first = split(b"h" * 3000, 500)
    assembler.add(first[0], "honest")
    for source in ("a", "b"):  # two floods fill the total, each within its own share
        for n in range(20):
            try:
                assembler.add(split(bytes([n]) * 3900, 1000)[0], source)
            except ProtocolError as exc:
                assert exc.reason == "too_busy"
    assert assembler.pending_of("honest") == 500 - HEADER_SIZE  # kept: nothing evicts it
    assert assembler.pending_of("a") <= 6000 and assembler.pending_of("b") <= 6000
    with pytest.raises(ProtocolError) as info:  # the total is full: multi-source floods make everyone wait
        assembler.add(split(b"z" * 3000, 1000)[0], "c")
    assert info.value.reason == "too_busy"


def test_tiny_chunks_count_for_their_bookkeeping():
    assembler = Reassembler(max_pending=1000)
    for n in range(1000 // 128):
        assembler.add(split(bytes([n, n]), HEADER_SIZE + 1)[0], f"s{n}")  # one byte of data, 128 counted
    with pytest.raises(ProtocolError) as info:
        assembler.add(split(b"xy", HEADER_SIZE + 1)[0], "last")
    assert info.value.reason == "too_busy" and assembler.pending_bytes == 7


def test_transfers_are_bounded_in_count_per_source_and_in_total():
    per_source = Reassembler(max_transfers_per_source=3)
    for n in range(3):
        per_source.add(split(bytes([n]) * 100, 60)[0], "one")
    with pytest.raises(ProtocolError) as info:
        per_source.add(split(b"x" * 100, 60)[0], "one")
    assert info.value.reason == "too_busy"
    per_source.add(split(b"x" * 100, 60)[0], "other")  # another source has its own count
    total = Reassembler(max_transfers=2)
    total.add(split(b"a" * 100, 60)[0], "one")
    total.add(split(b"b" * 100, 60)[0], "two")
    with pytest.raises(ProtocolError):
        total.add(split(b"c" * 100, 60)[0], "three")


def test_chunks_that_cannot_belong_to_their_payload_are_bad_chunk():
    chunks = split(b"abcdefgh" * 10, HEADER_SIZE + 20)  # 4 chunks of 20 bytes
    assembler = Reassembler()
    assembler.add(chunks[0])
    # A forged chunk 1 of the same transfer with more data than the payload has left.
    forged = split(b"abcdefgh" * 10 + b"z" * 100, HEADER_SIZE + 80)[0]
    header = bytearray(chunks[1][:HEADER_SIZE])
    data = forged[HEADER_SIZE:]
    header[-4:] = zlib.crc32(data).to_bytes(4, "little")
    with pytest.raises(ProtocolError) as info:
        assembler.add(bytes(header) + data)
    assert info.value.reason == "bad_chunk"
    empty = bytearray(chunks[2][:HEADER_SIZE])
    empty[-4:] = (0).to_bytes(4, "little")  # CRC-32 of no data
    with pytest.raises(ProtocolError) as info:
        assembler.add(bytes(empty))  # a chunk before the last holds no data
    assert info.value.reason == "bad_chunk"


def test_expiry_frees_the_sources_share():
    now = [0.0]
    assembler = Reassembler(max_payload=1000, ttl=10, clock=lambda: now[0])  # per source: 2,000 bytes
    assembler.add(split(b"a" * 1000, 1000)[0], "s")
    assembler.add(split(b"b" * 1000, 1000)[0], "s")
    with pytest.raises(ProtocolError):
        assembler.add(split(b"c" * 1000, 1000)[0], "s")
    now[0] = 11.0
    assembler.add(split(b"c" * 1000, 1000)[0], "s")
    assert assembler.expired == 2 and assembler.pending_transfers == 1
