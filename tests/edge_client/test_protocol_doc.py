"""docs/protocol.md says what the code accepts: every JSON example in it decodes with the real decoders.

Each fenced ``json`` block of the document is labelled by an HTML comment on
the line before it, ``<!-- example: NAME -->``, naming what it is an example
of: a control message class or ``frame header``. An unlabelled block fails,
so a new example cannot go unchecked.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest

from edge_client.errors import ProtocolError
from edge_client.frames import decode_frame
from edge_client.messages import Ack, Presence, RoundAnnouncement

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
_BLOCK = re.compile(r"^```json\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_LABEL = re.compile(r"<!-- example: (.+?) -->\s*\Z")
MESSAGES = {"Presence": Presence, "RoundAnnouncement": RoundAnnouncement, "Ack": Ack}


def examples(text: str) -> list[tuple[str, str]]:
    """``(label, json text)`` of every fenced json block; the label is None when the line before has none."""
    found = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        label = _LABEL.search(before)
        found.append((label.group(1) if label else None, match.group(1)))
    return found


def without_comments(text: str) -> str:
    """The block without its ``// ...`` line comments (no example's string holds whitespace then ``//``)."""
    return "\n".join(re.sub(r"\s+//.*$", "", line) for line in text.splitlines())


EXAMPLES = examples(DOC.read_text(encoding="utf-8"))


def test_every_json_block_names_what_it_is_an_example_of():
    labels = [label for label, _ in EXAMPLES]
    assert None not in labels, "label every ```json block of docs/protocol.md with <!-- example: NAME -->"
    assert set(labels) <= {*MESSAGES, "frame header"}
    # The spec's own presence forms are there: the Last Will, and an online presence without a version.
    assert {"Presence", "RoundAnnouncement", "Ack", "frame header"} <= set(labels)


MESSAGE_EXAMPLES = [e for e in EXAMPLES if e[0] in MESSAGES]


@pytest.mark.parametrize("label, text", MESSAGE_EXAMPLES, ids=[f"{e[0]}-{i}" for i, e in enumerate(MESSAGE_EXAMPLES)])
def test_control_message_examples_decode_to_what_they_say(label, text):
    message = MESSAGES[label].from_bytes(text.encode())
    shown = json.loads(text)
    again = json.loads(message.to_bytes())
    assert {key: again[key] for key in shown} == shown  # every field shown is read as shown


def test_the_spec_presence_forms_decode_with_defaults():
    # The Last Will of docs/protocol.md and an online presence without a version (issue 11).
    assert Presence.from_bytes(b'{"status": "offline"}') == Presence("offline", 0, "")
    assert Presence.from_bytes(b'{"status": "online", "num_examples": 5}') == Presence("online", 5, "")
    for bad in (b"{}", b'{"status": "online", "num_examples": null}', b'{"status": "offline", "version": 3}'):
        with pytest.raises(ProtocolError):
            Presence.from_bytes(bad)


def test_the_frame_header_example_decodes_in_a_frame_laid_out_as_the_document_says():
    ((_, text),) = [e for e in EXAMPLES if e[0] == "frame header"]
    header = json.loads(without_comments(text))
    nbytes = sum(t["nbytes"] for t in header["tensors"])
    raw = json.dumps(header).encode()
    # magic, version 2, header length (little-endian), header, payload, CRC-32 of everything before it
    body = struct.pack("<4sBI", b"LFWT", 2, len(raw)) + raw + bytes(nbytes)
    frame = decode_frame(body + struct.pack("<I", zlib.crc32(body)))
    assert (frame.kind, frame.run, frame.round, frame.codec) == (
        header["kind"],
        header["run"],
        header["round"],
        header["codec"],
    )
    assert (frame.client_id, frame.num_examples, dict(frame.metrics)) == (
        header["client_id"],
        header["num_examples"],
        header["metrics"],
    )
    assert [(t.name, t.array.shape) for t in frame.tensors] == [
        (t["name"], tuple(t["shape"])) for t in header["tensors"]
    ]


def test_the_example_scan_finds_labels_and_unlabelled_blocks():
    text = "<!-- example: Ack -->\n```json\n{}\n```\n\ntext\n```json\n[]\n```\n"
    assert examples(text) == [("Ack", "{}\n"), (None, "[]\n")]
