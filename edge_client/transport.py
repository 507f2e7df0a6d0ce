"""How clients and the coordinator exchange messages: the transport abstraction.

A :class:`Transport` publishes and receives :class:`Message` objects on MQTT
topics. :mod:`edge_client.mqtt` implements it on paho-mqtt;
:class:`InMemoryTransport` implements it on an in-process
:class:`InMemoryBroker` so that coordinator tests run fast and exactly, with
optional fault injection. No paho import here: this module only needs the
standard library.

Every message travels with QoS 1. Model updates must arrive (QoS 0 may lose
them on a flaky Wi-Fi link), and the protocol layer above already tolerates the
duplicates QoS 1 can produce (chunks are idempotent), so QoS 2's extra round
trip would buy nothing.

Presence survives reconnections at the transport: a *birth* message (the
counterpart of the Last Will) is published, retained, on every connection,
from the network side, so a board busy training is announced ``online``
again as soon as its connection is back, without its own loop running.

Both transports deliver into a bounded :class:`MessageQueue`: when it is full
the oldest message is dropped and counted, so a slow consumer never blocks the
network thread nor grows the process without bound.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from edge_client.errors import BrokerDown, PayloadTooLarge, PublishFailed, TransportError

log = logging.getLogger(__name__)

QOS = 1
DEFAULT_QUEUE_SIZE = 10_000
# Bytes as well as messages: the coordinator's queue. A board's is smaller (BOARD_QUEUE_BYTES) but still holds
# a whole model's retained chunks (at most the reassembler's 64 MiB payload), which a board reads at subscribe.
DEFAULT_QUEUE_BYTES = 256 << 20
BOARD_QUEUE_BYTES = 96 << 20
# AWS IoT Core's message limit; local brokers accept more (pass max_payload=).
DEFAULT_MAX_PAYLOAD = 128 * 1024
_MAX_TOPIC_BYTES = 65_535  # MQTT strings carry a 16-bit length


@dataclass(frozen=True)
class Message:
    """One MQTT message. ``retain`` is True when the broker replayed a retained message.

    Also describes a Last Will: the message the broker publishes for a client
    whose connection dies without a clean close (``retain=True`` for presence).
    """

    topic: str
    payload: bytes
    retain: bool = False


@runtime_checkable
class Transport(Protocol):
    """Publish/subscribe over a broker, QoS 1, with a bounded receive queue."""

    max_payload: int
    """Largest payload :meth:`publish` accepts, in bytes; larger ones are chunked above."""

    birth: Message | None
    """Published (QoS 1) on every connection, the first and each reconnection, by the transport itself.

    The counterpart of the Last Will: retained ``online`` presence, which the
    broker replaced with the will (or lost, restarting without persistence)
    while the connection was down. Set it before :meth:`connect`; a new value
    applies from the next connection (publish it as well to change it now).
    """

    @property
    def connected(self) -> bool:
        """True while the transport can publish (and its subscriptions are active)."""
        ...

    @property
    def peer(self) -> str:
        """The broker, as log lines name it (never with a password)."""
        ...

    @property
    def dropped_messages(self) -> int:
        """Messages lost because the receive queue was full."""
        ...

    @property
    def reconnections(self) -> int:
        """Connections re-established after a loss: the broker may have lost every retained message meanwhile."""
        ...

    def connect(self) -> None:
        """Connect to the broker and subscribe every pattern given so far; :class:`BrokerDown` if unreachable."""
        ...

    def close(self) -> None:
        """Disconnect cleanly (the broker does not publish the will); idempotent."""
        ...

    def subscribe(self, pattern: str) -> None:
        """Receive messages on topics matching ``pattern``, now and after reconnections."""
        ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Send one message; return once the broker has it, else raise :class:`PublishFailed`."""
        ...

    def publish_many(self, messages: Sequence[Message]) -> None:
        """Send several messages in order (the chunks of one payload); return once the broker has them all."""
        ...

    def receive(self, timeout: float | None) -> Message | None:
        """Next message; None after ``timeout`` seconds (None waits forever) or once closed."""
        ...


# -- topics --------------------------------------------------------------------------


def check_topic(topic: str) -> None:
    """Raise ValueError unless ``topic`` is a valid MQTT topic name (no wildcards)."""
    _check_string(topic, "topic")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r} contains a wildcard (+ or #); wildcards belong in subscriptions only")


def check_pattern(pattern: str) -> None:
    """Raise ValueError unless ``pattern`` is a valid MQTT topic filter."""
    _check_string(pattern, "subscription pattern")
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level in ("+", "#"):
            if level == "#" and i != len(levels) - 1:
                raise ValueError(f"pattern {pattern!r}: '#' must be the last level")
        elif "+" in level or "#" in level:
            raise ValueError(f"pattern {pattern!r}: a wildcard must fill a whole level, as in 'a/+/c' or 'a/#'")


def _check_string(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"an MQTT {what} must be a non-empty string, got {value!r}")
    if "\0" in value:
        raise ValueError(f"an MQTT {what} must not contain the NUL character: {value!r}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"an MQTT {what} must be valid UTF-8: {value!r}") from exc
    if size > _MAX_TOPIC_BYTES:
        raise ValueError(f"an MQTT {what} is at most {_MAX_TOPIC_BYTES} bytes of UTF-8")


def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the subscription ``pattern`` under MQTT rules.

    ``+`` matches exactly one level (possibly empty), ``#`` (last level only)
    matches any number of levels including none, so ``a/#`` matches ``a``.
    Topics starting with ``$`` are not matched by a pattern starting with a
    wildcard. Raises ValueError for an invalid pattern or topic.
    """
    check_pattern(pattern)
    check_topic(topic)
    if topic.startswith("$") and pattern[0] in "+#":
        return False
    wanted = pattern.split("/")
    levels = topic.split("/")
    for i, want in enumerate(wanted):
        if want == "#":
            return True
        if i >= len(levels):
            return False
        if want != "+" and want != levels[i]:
            return False
    return len(wanted) == len(levels)


# -- the bounded receive queue -------------------------------------------------------


class MessageQueue:
    """A thread-safe FIFO of at most ``maxsize`` messages and ``max_bytes`` payload bytes that drops its OLDEST.

    Dropping the oldest (not refusing the newest) keeps the freshest state,
    which is what a federated round needs: a stale round announcement is worth
    less than the current one. Both bounds hold: a count alone let a flood of
    large messages (10,000 of 128 KiB) grow a process past a gigabyte. A
    message larger than ``max_bytes`` on its own is dropped itself. Drops are
    counted and logged (at 1, 2, 4, ... drops, so a sustained overload cannot
    flood a board's log).
    """

    def __init__(
        self, maxsize: int = DEFAULT_QUEUE_SIZE, name: str = "receive queue", max_bytes: int = DEFAULT_QUEUE_BYTES
    ):
        if maxsize < 1 or max_bytes < 1:
            raise ValueError(f"queue size and max_bytes must be at least 1, got {maxsize} and {max_bytes}")
        self.maxsize, self.max_bytes = maxsize, max_bytes
        self.name = name
        self._items: deque[Message] = deque()
        self._bytes = 0  # payload bytes queued
        self._cond = threading.Condition()
        self._dropped = 0
        self._closed = False

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def queued_bytes(self) -> int:
        """Payload bytes waiting to be read."""
        with self._cond:
            return self._bytes

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, message: Message) -> None:
        """Append ``message`` without ever blocking; drop the oldest while either bound is exceeded."""
        size = len(message.payload)
        with self._cond:
            if size > self.max_bytes:
                self._drop(message)
                return
            while self._items and (len(self._items) >= self.maxsize or self._bytes + size > self.max_bytes):
                lost = self._items.popleft()
                self._bytes -= len(lost.payload)
                self._drop(lost)
            self._items.append(message)
            self._bytes += size
            self._cond.notify()

    def _drop(self, lost: Message) -> None:
        self._dropped += 1
        if self._dropped & (self._dropped - 1) == 0:
            log.warning(
                "%s full (%d messages, %d bytes at most): dropped the oldest, on %s; %d dropped so far. "
                "The consumer is too slow; receive faster or raise queue_size / queue_bytes",
                self.name,
                self.maxsize,
                self.max_bytes,
                lost.topic,
                self._dropped,
            )

    def get(self, timeout: float | None) -> Message | None:
        """Oldest message; None after ``timeout`` seconds, or at once when closed and empty."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed, timeout)
            if not self._items:
                return None
            message = self._items.popleft()
            self._bytes -= len(message.payload)
            return message

    def close(self) -> None:
        """Wake every waiting :meth:`get`; messages already queued can still be read."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# -- the in-memory broker ------------------------------------------------------------


@dataclass
class _DropRule:
    """Lose the next ``remaining`` messages on topics matching ``pattern`` (mutable: it counts down)."""

    pattern: str
    remaining: int


class InMemoryBroker:
    """A thread-safe in-process MQTT broker for exact, fast tests.

    Implements what litefed relies on: wildcard subscriptions, retained
    messages (an empty retained payload clears the topic), the Last Will on an
    unclean disconnect and session takeover by client id. It delivers a
    message once per matching client even when several of its patterns match
    (real brokers may deliver once per subscription). Messages delivered to
    an established subscription carry ``retain=False``; retained ones replayed
    on subscribe carry ``retain=True``, as MQTT 3.1.1 requires.

    Fault injection: :meth:`duplicate_next`, :meth:`drop_matching`, and
    :meth:`stop` / :meth:`start` (or :meth:`restart`) for a broker that goes
    away: while it is down, connecting raises :class:`BrokerDown` and
    publishing :class:`~edge_client.errors.PublishFailed`; when it is back,
    the transports it lost reconnect by themselves (as MQTT transports do),
    each publishing its birth message.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._clients: dict[str, InMemoryTransport] = {}
        self._retained: dict[str, Message] = {}
        self._duplicate = 0
        self._drop_rules: list[_DropRule] = []
        self._down = False
        self._lost: list[InMemoryTransport] = []  # connected when the broker stopped: they reconnect on start()
        self.published = 0  # messages accepted from publishers, lost ones included

    @property
    def client_ids(self) -> frozenset[str]:
        """Ids of the connected clients."""
        with self._lock:
            return frozenset(self._clients)

    @property
    def retained(self) -> dict[str, Message]:
        """A copy of the retained messages by topic."""
        with self._lock:
            return dict(self._retained)

    @property
    def running(self) -> bool:
        """False between :meth:`stop` and :meth:`start`."""
        return not self._down

    def stop(self, *, persistent: bool = False) -> None:
        """Go down: every connection is lost at once; without ``persistent`` the retained messages go too.

        No Last Will is published: the broker that would publish it is gone.
        """
        with self._lock:
            self._down = True
            self._lost += self._clients.values()
            for client in self._clients.values():
                client._connected = False
            self._clients.clear()
            if not persistent:
                self._retained.clear()
        log.debug("in-memory broker: down (%s)", "persistent" if persistent else "retained messages lost")

    def start(self) -> None:
        """Come back up; the transports lost by :meth:`stop` reconnect (in their order) unless closed since."""
        with self._lock:
            self._down = False
            lost, self._lost = self._lost, []
            for client in lost:
                if not client._closed and not client._connected:
                    self._attach(client)

    def restart(self, *, persistent: bool = False) -> None:
        """:meth:`stop`, then :meth:`start`: a broker restart the transports ride out."""
        self.stop(persistent=persistent)
        self.start()

    def duplicate_next(self, count: int = 1) -> None:
        """Deliver each of the next ``count`` published messages twice (a QoS 1 resend)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        with self._lock:
            self._duplicate += count

    def drop_matching(self, pattern: str, count: int = 1) -> None:
        """Lose the next ``count`` messages published on topics matching ``pattern``.

        A lost message reaches no subscriber and is not retained; the publisher
        is not told, as when a broker crashes before forwarding.
        """
        check_pattern(pattern)
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        with self._lock:
            self._drop_rules.append(_DropRule(pattern, count))

    def publish(self, message: Message) -> None:
        """Route ``message`` as if a client had published it (tests may call this directly)."""
        check_topic(message.topic)
        with self._lock:
            if self._down:
                raise PublishFailed("the in-memory broker is down (stopped by the test); start() it first")
            self.published += 1
            if self._take_drop_rule(message.topic):
                log.debug("in-memory broker: dropped %s (fault injection)", message.topic)
                return
            if message.retain:
                if message.payload:
                    self._retained[message.topic] = Message(message.topic, message.payload, retain=True)
                else:
                    self._retained.pop(message.topic, None)
            copies = 1
            if self._duplicate:
                self._duplicate -= 1
                copies = 2
            delivered = Message(message.topic, message.payload, retain=False)
            for client in self._clients.values():
                if client._wants(message.topic):
                    for _ in range(copies):
                        client._queue.put(delivered)

    def _take_drop_rule(self, topic: str) -> bool:
        for rule in self._drop_rules:
            if topic_matches(rule.pattern, topic):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._drop_rules.remove(rule)
                return True
        return False

    def _attach(self, client: InMemoryTransport) -> None:
        with self._lock:
            if self._down:
                raise BrokerDown(f"cannot reach the in-memory broker as {client.client_id!r}: it is down; retry later")
            old = self._clients.get(client.client_id)
            if old is not None and old is not client:
                # MQTT session takeover: the broker disconnects the older connection.
                log.info("in-memory broker: client id %r taken over by a new connection", client.client_id)
                old._connected = False
            self._clients[client.client_id] = client
            if client._ever_connected:
                client.reconnections += 1
            client._connected = client._ever_connected = True
            for pattern in client._patterns:
                self._replay_retained(client, pattern)
            if client.birth is not None:
                self.publish(client.birth)

    def _detach(self, client: InMemoryTransport, *, unclean: bool) -> None:
        with self._lock:
            if self._clients.get(client.client_id) is client:
                del self._clients[client.client_id]
            was_connected = client._connected
            client._connected = False
            if unclean and was_connected and client.will is not None:
                self.publish(client.will)

    def _replay_retained(self, client: InMemoryTransport, pattern: str) -> None:
        for topic in sorted(self._retained):
            if topic_matches(pattern, topic):
                client._queue.put(self._retained[topic])


class InMemoryTransport:
    """A :class:`Transport` attached to an :class:`InMemoryBroker`.

    :meth:`drop` simulates a power loss or network failure: the broker
    publishes the will. Unlike :meth:`close`, a dropped transport may
    :meth:`connect` again, keeping its subscriptions (as the MQTT transport
    does when it reconnects); every connection after the first counts in
    :attr:`reconnections` and publishes :attr:`birth`, as MQTT connections do.
    """

    def __init__(
        self,
        broker: InMemoryBroker,
        client_id: str,
        will: Message | None = None,
        *,
        birth: Message | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ):
        for message in (will, birth):
            if message is not None:
                check_topic(message.topic)
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.birth = birth
        self.max_payload = max_payload
        self.reconnections = 0
        self._queue = MessageQueue(queue_size, name=f"receive queue of {client_id!r}", max_bytes=queue_bytes)
        self._patterns: list[str] = []
        self._connected = False
        self._ever_connected = False
        self._closed = False

    def __repr__(self) -> str:
        return f"InMemoryTransport({self.client_id!r}, connected={self._connected})"

    @property
    def peer(self) -> str:
        return "the in-memory broker"

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def dropped_messages(self) -> int:
        return self._queue.dropped

    def connect(self) -> None:
        if self._closed:
            raise TransportError(f"transport {self.client_id!r} is closed; create a new one to connect again")
        self.broker._attach(self)

    def close(self) -> None:
        self._closed = True
        self.broker._detach(self, unclean=False)
        self._queue.close()

    def drop(self) -> None:
        """Lose the connection without a clean close: the broker publishes the will."""
        self.broker._detach(self, unclean=True)

    def subscribe(self, pattern: str) -> None:
        check_pattern(pattern)
        with self.broker._lock:
            if pattern not in self._patterns:
                self._patterns.append(pattern)
            if self._connected:
                # MQTT replays retained messages on every SUBSCRIBE, repeated ones included.
                self.broker._replay_retained(self, pattern)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        check_topic(topic)
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes on {topic} exceeds max_payload={self.max_payload}; "
                "split it with edge_client.chunks first"
            )
        if not self._connected:
            raise PublishFailed(f"{self.client_id!r} is not connected to the in-memory broker; connect() first")
        self.broker.publish(Message(topic, bytes(payload), retain))

    def publish_many(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self.publish(message.topic, message.payload, retain=message.retain)

    def receive(self, timeout: float | None) -> Message | None:
        return self._queue.get(timeout)

    def _wants(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self._patterns)
