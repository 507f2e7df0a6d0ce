"""The transport layer without a network: topic matching, the bounded queue, the
in-memory broker, reconnection delays and CONNACK refusals (broker URLs: test_broker_url.py)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_client.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    BrokerUrlError,
    PayloadTooLarge,
    PublishFailed,
    TransportError,
)
from edge_client.mqtt import Backoff, BrokerUrl, MqttTransport, _refusal_error
from edge_client.transport import (
    BrokerDown,
    InMemoryBroker,
    InMemoryTransport,
    Message,
    MessageQueue,
    Transport,
    check_pattern,
    topic_matches,
)

# -- topic_matches -------------------------------------------------------------------

MATCHES = [
    ("a/b/c", "a/b/c", True),
    ("a/b/c", "a/b", False),
    ("a/b", "a/b/c", False),
    ("a/+/c", "a/x/c", True),
    ("a/+/c", "a/x/y/c", False),
    ("a/+", "a/", True),  # + matches an empty level
    ("+/+", "/", True),
    ("+", "/", False),
    ("/+", "/x", True),
    ("+", "a", True),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("a/#", "a", True),  # # also matches the parent level
    ("a/#", "a/b/c", True),
    ("a/#", "ab", False),
    ("a/b/#", "a/b", True),
    ("+/#", "a", True),
    ("a/+/#", "a", False),
    ("A/b", "a/b", False),  # case-sensitive
    ("#", "$SYS/broker", False),  # wildcards at the start do not match $ topics
    ("+/broker", "$SYS/broker", False),
    ("$SYS/#", "$SYS/broker", True),
    ("$SYS/+", "$SYS/broker", True),
    ("a/$x", "a/$x", True),
    ("a/#", "a/$x", True),  # the $ rule is for the first level only
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_topic_matches_examples(pattern, topic, expected):
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize("pattern", ["", "a/#/b", "#/a", "a#", "a/b+", "+a/b", "a/##", "a\0b"])
def test_invalid_patterns_are_refused(pattern):
    with pytest.raises(ValueError):
        check_pattern(pattern)
    with pytest.raises(ValueError):
        topic_matches(pattern, "a/b")


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "+", "a\0b", "x" * 65_536])
def test_invalid_topics_are_refused(topic):
    with pytest.raises(ValueError):
        topic_matches("#", topic)


_LEVELS = st.sampled_from(["a", "b", "", "$s", "long level", "é"])
_TOPICS = st.lists(_LEVELS, min_size=1, max_size=5).map("/".join).filter(bool)


@st.composite
def _patterns(draw):
    levels = draw(st.lists(st.one_of(_LEVELS, st.just("+")), min_size=0, max_size=5))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    return "/".join(levels)


@settings(max_examples=400, deadline=None)
@given(_patterns().filter(bool), _TOPICS)
def test_topic_matches_agrees_with_paho(pattern, topic):
    assert topic_matches(pattern, topic) == topic_matches_sub(pattern, topic)


@given(_TOPICS)
def test_a_topic_matches_itself_and_hash_matches_non_dollar_topics(topic):
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic) is not topic.startswith("$")


@given(_TOPICS, st.data())
def test_generalising_a_topic_keeps_the_match(topic, data):
    levels = topic.split("/")
    # Any non-first level replaced by +, and any proper prefix followed by #, still match.
    i = data.draw(st.integers(1, len(levels)), label="level") if len(levels) > 1 else None
    if i is not None and i < len(levels):
        plus = levels[:i] + ["+"] + levels[i + 1 :]
        assert topic_matches("/".join(plus), topic)
    cut = data.draw(st.integers(1, len(levels)), label="prefix")
    assert topic_matches("/".join(levels[:cut] + ["#"]), topic)
    # One level more or less never matches without #.
    assert not topic_matches("/".join(levels + ["x"]), topic)


# -- MessageQueue --------------------------------------------------------------------


def _msg(i: int, topic: str = "t") -> Message:
    return Message(topic, str(i).encode())


def test_full_queue_drops_the_oldest_counts_and_warns(caplog):
    queue = MessageQueue(3)
    with caplog.at_level(logging.WARNING, logger="edge_client.transport"):
        for i in range(7):
            queue.put(_msg(i))
    assert queue.dropped == 4
    assert [queue.get(0) for _ in range(3)] == [_msg(4), _msg(5), _msg(6)]
    assert queue.get(0) is None
    # Warnings at the 1st, 2nd and 4th drop, not at every one.
    warnings = [r for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert len(warnings) == 3
    assert "raise queue_size" in warnings[0].getMessage()


def test_get_times_out_with_none_and_close_wakes_a_blocked_reader():
    queue = MessageQueue(2)
    assert queue.get(0.01) is None
    got: list[Message | None] = []
    reader = threading.Thread(target=lambda: got.append(queue.get(None)))
    reader.start()
    queue.close()
    reader.join(5)
    assert not reader.is_alive()
    assert got == [None]


def test_closed_queue_still_hands_out_what_it_holds():
    queue = MessageQueue(2)
    queue.put(_msg(1))
    queue.close()
    assert queue.get(None) == _msg(1)
    assert queue.get(None) is None


def test_queue_size_must_be_positive():
    with pytest.raises(ValueError):
        MessageQueue(0)
    with pytest.raises(ValueError):
        MessageQueue(3, max_bytes=0)


def test_the_queue_is_bounded_in_bytes_too_dropping_the_oldest(caplog):
    queue = MessageQueue(100, max_bytes=250)
    with caplog.at_level(logging.WARNING, logger="edge_client.transport"):
        for i in range(5):
            queue.put(Message("t", bytes([i]) * 100))
    # 100 messages would fit by count; 250 bytes hold two of 100 bytes, so the three oldest went.
    assert queue.dropped == 3 and len(queue) == 2 and queue.queued_bytes == 200
    assert [queue.get(0).payload[0] for _ in range(2)] == [3, 4]
    assert queue.queued_bytes == 0
    warnings = [r.getMessage() for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert len(warnings) == 2 and "250 bytes" in warnings[0] and "queue_bytes" in warnings[0]  # at drops 1 and 2


def test_a_message_larger_than_the_byte_bound_is_dropped_itself():
    queue = MessageQueue(10, max_bytes=100)
    queue.put(_msg(1))
    queue.put(Message("big", bytes(101)))
    assert queue.dropped == 1 and [queue.get(0), queue.get(0)] == [_msg(1), None]


def test_in_memory_transports_take_the_byte_bound(broker):
    slow = InMemoryTransport(broker, "slow", queue_bytes=1000)
    slow.connect()
    slow.subscribe("t")
    sender = InMemoryTransport(broker, "sender")
    sender.connect()
    for _ in range(5):
        sender.publish("t", bytes(400))
    assert slow.dropped_messages == 3


# -- InMemoryBroker ------------------------------------------------------------------


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


def _client(broker: InMemoryBroker, client_id: str, *patterns: str, **kwargs) -> InMemoryTransport:
    transport = InMemoryTransport(broker, client_id, **kwargs)
    transport.connect()
    for pattern in patterns:
        transport.subscribe(pattern)
    return transport


def _drain(transport: InMemoryTransport) -> list[Message]:
    out = []
    for _ in range(10_000):  # bounded: the queues here never hold more
        message = transport.receive(0)
        if message is None:
            return out
        out.append(message)
    raise AssertionError("queue did not drain")


def test_both_transports_satisfy_the_protocol(broker):
    assert isinstance(InMemoryTransport(broker, "x"), Transport)
    assert isinstance(MqttTransport("mqtt://127.0.0.1:1", "x"), Transport)


def test_round_trip_with_wildcards(broker):
    sub = _client(broker, "sub", "fl/+/update", "cmd/#")
    pub = _client(broker, "pub")
    for topic in ["fl/c1/update", "fl/c1/other", "fl/c1/x/update", "cmd", "cmd/a/b", "other"]:
        pub.publish(topic, topic.encode())
    assert [m.topic for m in _drain(sub)] == ["fl/c1/update", "cmd", "cmd/a/b"]
    assert _drain(pub) == []


def test_a_publisher_receives_its_own_messages_once_despite_overlapping_patterns(broker):
    client = _client(broker, "c", "a/#", "a/+", "a/b")
    client.publish("a/b", b"1")
    assert _drain(client) == [Message("a/b", b"1")]


def test_retained_message_reaches_a_late_subscriber_flagged_retained(broker):
    pub = _client(broker, "pub")
    early = _client(broker, "early", "state/#")
    pub.publish("state/round", b"3", retain=True)
    pub.publish("state/round", b"4", retain=True)  # replaces 3
    late = _client(broker, "late", "state/+")
    assert _drain(early) == [Message("state/round", b"3"), Message("state/round", b"4")]
    assert _drain(late) == [Message("state/round", b"4", retain=True)]
    assert broker.retained == {"state/round": Message("state/round", b"4", retain=True)}
    late.subscribe("state/+")  # MQTT replays retained messages on every SUBSCRIBE
    assert _drain(late) == [Message("state/round", b"4", retain=True)]


def test_empty_retained_payload_clears_and_is_still_delivered(broker):
    pub = _client(broker, "pub")
    live = _client(broker, "live", "s")
    pub.publish("s", b"x", retain=True)
    pub.publish("s", b"", retain=True)
    assert _drain(live) == [Message("s", b"x"), Message("s", b"")]
    assert broker.retained == {}
    assert _drain(_client(broker, "late", "s")) == []


def test_will_is_published_on_drop_but_not_on_close(broker):
    watcher = _client(broker, "watcher", "presence/+")
    will = Message("presence/a", b"offline", retain=True)
    a = _client(broker, "a", will=will)
    b = _client(broker, "b", will=Message("presence/b", b"offline", retain=True))
    b.close()
    assert _drain(watcher) == []
    a.drop()
    assert not a.connected
    assert _drain(watcher) == [Message("presence/a", b"offline")]
    assert broker.retained == {"presence/a": Message("presence/a", b"offline", retain=True)}
    a.drop()  # already disconnected: no second will
    assert _drain(watcher) == []


def test_dropped_transport_reconnects_with_its_subscriptions_closed_one_cannot(broker):
    pub = _client(broker, "pub")
    client = _client(broker, "c", "t/#")
    client.drop()
    pub.publish("t/lost", b"1", retain=True)  # published while c was away: not queued for it
    with pytest.raises(PublishFailed, match="connect"):
        client.publish("t/x", b"")
    client.connect()
    pub.publish("t/live", b"2")
    assert _drain(client) == [Message("t/lost", b"1", retain=True), Message("t/live", b"2")]
    client.close()
    with pytest.raises(TransportError, match="closed"):
        client.connect()
    assert broker.client_ids == {"pub"}


def test_the_birth_message_is_published_on_every_connection_and_reconnections_are_counted(broker):
    watcher = _client(broker, "watcher", "presence/+")
    will, birth = Message("presence/a", b"offline", retain=True), Message("presence/a", b"online", retain=True)
    a = _client(broker, "a", will=will, birth=birth)
    assert a.reconnections == 0 and _drain(watcher) == [Message("presence/a", b"online")]
    a.drop()
    a.connect()
    assert a.reconnections == 1
    assert _drain(watcher) == [Message("presence/a", b"offline"), Message("presence/a", b"online")]
    a.birth = None  # from now on nothing is said on connecting
    a.drop()
    a.connect()
    assert a.reconnections == 2 and _drain(watcher) == [Message("presence/a", b"offline")]


@pytest.mark.parametrize("persistent", [False, True])
def test_a_broker_restart_loses_every_connection_and_the_transports_reconnect(broker, persistent):
    pub = _client(broker, "pub")
    board = _client(broker, "board", "round", birth=Message("presence/board", b"online", retain=True))
    board.will = Message("presence/board", b"offline", retain=True)
    pub.publish("round", b"3", retain=True)
    _drain(board)
    broker.restart(persistent=persistent)
    assert board.connected and pub.connected and board.reconnections == pub.reconnections == 1
    # No will: the broker that would publish it went down. The birth said online again.
    assert broker.retained.get("presence/board") == Message("presence/board", b"online", retain=True)
    assert ("round" in broker.retained) is persistent
    assert _drain(board) == ([Message("round", b"3", retain=True)] if persistent else [])
    pub.publish("round", b"4")
    assert _drain(board) == [Message("round", b"4")], "the subscriptions survive the restart"


def test_a_stopped_broker_refuses_connections_and_publishes_until_it_starts(broker):
    board = _client(broker, "board", "t")
    gone = _client(broker, "gone")
    late = InMemoryTransport(broker, "late")
    broker.stop()
    assert not broker.running and not board.connected and broker.client_ids == frozenset()
    with pytest.raises(BrokerDown, match="down"):
        late.connect()
    assert isinstance(BrokerDown("x"), BrokerUnavailable)
    with pytest.raises(PublishFailed):
        board.publish("t", b"")
    with pytest.raises(PublishFailed, match="down"):
        broker.publish(Message("t", b""))
    gone.close()  # closed while the broker was away: it stays closed
    broker.start()
    assert broker.running and broker.client_ids == {"board"} and board.reconnections == 1
    late.connect()
    late.publish("t", b"back")
    assert _drain(board) == [Message("t", b"back")]


def test_connecting_with_a_taken_client_id_takes_the_session_over(broker):
    old = _client(broker, "board", "t")
    new = _client(broker, "board", "t")
    assert not old.connected and new.connected
    _client(broker, "pub").publish("t", b"1")
    assert _drain(new) == [Message("t", b"1")]
    assert _drain(old) == []


def test_bounded_receive_queue_drops_oldest_and_counts(broker):
    slow = _client(broker, "slow", "t", queue_size=5)
    pub = _client(broker, "pub")
    for i in range(12):
        pub.publish("t", str(i).encode())
    assert slow.dropped_messages == 7
    assert [m.payload for m in _drain(slow)] == [b"7", b"8", b"9", b"10", b"11"]


def test_duplicate_next_delivers_exactly_that_many_messages_twice(broker):
    sub = _client(broker, "sub", "#")
    other = _client(broker, "other", "t")
    pub = _client(broker, "pub")
    broker.duplicate_next(2)
    for i in range(4):
        pub.publish("t", str(i).encode())
    assert [m.payload for m in _drain(sub)] == [b"0", b"0", b"1", b"1", b"2", b"3"]
    assert [m.payload for m in _drain(other)] == [b"0", b"0", b"1", b"1", b"2", b"3"]


def test_drop_matching_loses_that_many_matching_messages_only(broker):
    sub = _client(broker, "sub", "#")
    pub = _client(broker, "pub")
    broker.drop_matching("up/+", count=2)
    pub.publish("up/a", b"1", retain=True)  # lost: not retained either
    pub.publish("down", b"2")
    pub.publish("up/b", b"3")  # lost
    pub.publish("up/a", b"4")
    assert [m.payload for m in _drain(sub)] == [b"2", b"4"]
    assert broker.retained == {}
    assert broker.published == 4


def test_fault_hooks_validate_their_arguments(broker):
    with pytest.raises(ValueError):
        broker.duplicate_next(-1)
    with pytest.raises(ValueError):
        broker.drop_matching("a/#", count=0)
    with pytest.raises(ValueError):
        broker.drop_matching("a/#/b")


def test_payload_over_max_payload_is_refused(broker):
    client = _client(broker, "c", "t", max_payload=10)
    client.publish("t", b"x" * 10)
    with pytest.raises(PayloadTooLarge, match="chunks"):
        client.publish("t", b"x" * 11)
    assert _drain(client) == [Message("t", b"x" * 10)]


def test_invalid_topics_are_refused_by_transports(broker):
    client = _client(broker, "c")
    with pytest.raises(ValueError):
        client.publish("a/+", b"")
    with pytest.raises(ValueError):
        client.subscribe("a/#/b")


def test_concurrent_publishers_lose_nothing(broker):
    sub = _client(broker, "sub", "t/+")
    publishers = [_client(broker, f"p{i}") for i in range(4)]

    def send(transport: InMemoryTransport) -> None:
        for j in range(250):
            transport.publish(f"t/{transport.client_id}", str(j).encode())

    threads = [threading.Thread(target=send, args=(p,)) for p in publishers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    received = _drain(sub)
    assert len(received) == 1000
    for p in publishers:  # per-publisher order is kept
        mine = [int(m.payload) for m in received if m.topic == f"t/{p.client_id}"]
        assert mine == list(range(250))


def test_mqtt_transport_checks_its_arguments_before_any_network():
    with pytest.raises(ValueError, match="client_id"):
        MqttTransport("mqtt://127.0.0.1:1", "")
    with pytest.raises(ValueError, match="protocol"):
        MqttTransport("mqtt://127.0.0.1:1", "c", protocol="3")
    with pytest.raises(BrokerUrlError):
        MqttTransport("tcp://127.0.0.1:1", "c")
    transport = MqttTransport("mqtt://127.0.0.1:1", "c", max_payload=4)
    with pytest.raises(PayloadTooLarge, match="max_payload=4"):
        transport.publish("t", b"12345")
    assert not transport.connected


def test_an_unconnected_mqtt_transport_defers_subscriptions_refuses_publishes_and_closes_once():
    # Its connection's state, seen through the transport's API alone (no broker: port 1 is closed).
    transport = MqttTransport("mqtt://127.0.0.1:1", "c")
    assert repr(transport) == "MqttTransport('mqtt://127.0.0.1:1', 'c', connected=False)"
    assert transport.reconnections == 0
    transport.subscribe("a/#", timeout=0.01)  # remembered for the next connection, not an error
    with pytest.raises(PublishFailed, match="not connected"):
        transport.publish("a/b", b"x", timeout=0.01)
    assert not transport.wait_connected(0.01)
    transport.close()
    transport.close()
    started = time.monotonic()
    assert not transport.wait_connected(5)  # closed: both return at once instead of waiting
    assert transport.receive(5) is None
    assert time.monotonic() - started < 2
    with pytest.raises(TransportError, match="closed"):
        transport.connect(timeout=0.1)


# -- reconnection delays and refusals ------------------------------------------------


def test_default_backoff_numbers():
    backoff = Backoff()
    assert [backoff.delay(n, rand=0.0) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [backoff.delay(n, rand=1.0) for n in range(3)] == [0.5, 1, 2]


@given(
    st.floats(0.01, 10),
    st.floats(1, 4),
    st.floats(0, 1),
    st.integers(0, 10_000),
    st.floats(0, 1, exclude_max=True),
)
def test_backoff_delay_stays_within_its_jitter_window(initial, factor, jitter, attempt, rand):
    backoff = Backoff(initial=initial, maximum=100.0, factor=factor, jitter=jitter)
    ceiling = min(100.0, initial * factor ** min(attempt, 64))
    delay = backoff.delay(attempt, rand=rand)
    assert ceiling * (1 - jitter) - 1e-9 <= delay <= ceiling + 1e-9
    assert delay <= 100.0 + 1e-9
    assert backoff.delay(attempt + 1, rand=0.0) >= backoff.delay(attempt, rand=0.0)


def test_backoff_draws_differ_between_calls():
    delays = {Backoff().delay(3) for _ in range(20)}
    assert len(delays) > 1
    assert all(4.0 <= d <= 8.0 for d in delays)


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 5, "maximum": 1}, {"factor": 0.5}, {"jitter": 2}])
def test_bad_backoff_is_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)


@pytest.mark.parametrize(
    ("name", "auth", "hint"),
    [
        ("Bad user name or password", True, "user name and password"),
        ("Not authorized", True, "user name and password"),
        ("Client identifier not valid", False, "client id"),
        ("Unsupported protocol version", False, "protocol="),
        ("Server unavailable", False, "Retry later"),
    ],
)
def test_connack_refusals_become_distinct_errors(name, auth, hint):
    url = BrokerUrl.parse("mqtt://pi:secret@host")
    error = _refusal_error(url, "pi-17", ReasonCode(PacketTypes.CONNACK, aName=name))
    assert isinstance(error, BrokerUnavailable)
    assert isinstance(error, BrokerAuthError) is auth
    message = str(error)
    assert name in message and hint in message and "mqtt://pi:***@host:1883" in message
    assert "secret" not in message


def test_a_transport_names_its_broker_for_log_lines_without_the_password():
    from edge_client.mqtt import MqttTransport

    mqtt = MqttTransport("mqtt://pi-1:s3cret@127.0.0.1:1883", "pi-1")
    try:
        assert mqtt.peer == "mqtt://pi-1:***@127.0.0.1:1883"
    finally:
        mqtt.close()
    assert InMemoryTransport(InMemoryBroker(), "pi-1").peer == "the in-memory broker"
