"""MQTT over paho-mqtt 2.x: the only module of litefed that imports paho.

:class:`MqttTransport` implements :class:`edge_client.transport.Transport`:
it publishes and hands out received messages. Its connection's life (the
handshake, CONNACK refusals, reconnection with :class:`Backoff` and the
subscriptions sent again after each reconnection) is a :class:`_Connection`,
which owns the paho client and its callbacks.
paho runs its network loop in a background thread (``loop_start``); the
callbacks on that thread only put messages into the bounded receive queue and
update connection state, so user code never runs on (or blocks) paho's thread.

Sessions are clean (MQTT 3.1.1 ``clean_session=True``, MQTT 5 ``clean_start``
with no session expiry), and every subscription is sent again after each
reconnection. A persistent session would let the broker queue QoS 1 messages
for offline boards, but mosquitto without persistence and amqtt lose sessions
when they restart anyway, an offline board would get stale rounds replayed,
and a fleet of dead boards would keep broker memory busy. The federation's
current state travels in retained messages instead, which a reconnecting
client receives when it subscribes again.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_client.broker_url import Backoff, BrokerUrl  # paho-free; importable from here as before
from edge_client.errors import (
    BrokerAuthError,
    BrokerDown,
    BrokerUnavailable,
    BrokerUrlError,
    PayloadTooLarge,
    PublishFailed,
    SubscribeFailed,
    TransportError,
)
from edge_client.transport import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    QOS,
    Message,
    MessageQueue,
    check_pattern,
    check_topic,
)

log = logging.getLogger(__name__)

PROTOCOLS = {"3.1.1": paho.MQTTv311, "5": paho.MQTTv5}
# paho keeps every QoS 1 message until its PUBACK and resends it after a
# reconnection; cap that store so a long outage cannot exhaust a board's RAM.
MAX_UNACKED_PUBLISHES = 64
# Messages publish_many keeps in flight: well under paho's queue cap above.
PUBLISH_WINDOW = 32
# CONNACK reason codes that mean "your credentials or certificate": retrying will not help.
_AUTH_REFUSALS = {134, 135, 138, 140}  # bad user name or password, not authorized, banned, bad auth method


# -- the transport -------------------------------------------------------------------


class MqttTransport:
    """A :class:`~edge_client.transport.Transport` on a real MQTT broker (paho-mqtt 2.x).

    ``will`` is the Last Will (QoS 1): the broker publishes it when this
    client's connection dies without :meth:`close` (power loss, crash, network
    failure after the keepalive). Give it ``retain=True`` for presence.
    ``birth`` (also the attribute :attr:`birth`) is its counterpart, published
    with QoS 1 from paho's thread as soon as each connection is accepted, the
    first and every reconnection, so presence comes back with the connection
    even while the owner is busy (training, say) and reads no messages.
    A board that loses power sends no TCP reset: the broker notices after 1.5 x
    ``keepalive`` seconds of silence. ``ack_timeout`` bounds how long
    :meth:`publish` and :meth:`subscribe` wait for the broker's
    acknowledgement. ``protocol`` is ``"3.1.1"`` or ``"5"``.
    After a lost connection the transport reconnects by itself, waiting as
    ``backoff`` says, and subscribes every pattern again.
    """

    def __init__(
        self,
        url: str | BrokerUrl,
        client_id: str,
        *,
        will: Message | None = None,
        birth: Message | None = None,
        protocol: str = "3.1.1",
        keepalive: int = 30,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        ack_timeout: float = 10.0,
        backoff: Backoff | None = None,
    ):
        self.url = url if isinstance(url, BrokerUrl) else BrokerUrl.parse(url)
        if not client_id:
            raise ValueError("client_id must be a non-empty string: the broker tells clients apart by it")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        self.client_id = client_id
        self.will = will
        if birth is not None:
            check_topic(birth.topic)
        self.birth = birth
        self.protocol = protocol
        self.keepalive = keepalive
        self.max_payload = max_payload
        self.ack_timeout = ack_timeout
        self.backoff = backoff or Backoff()
        self._queue = MessageQueue(queue_size, name=f"receive queue of {client_id!r}", max_bytes=queue_bytes)
        self._connection = _Connection(
            _make_client(self.url, client_id, protocol, will),
            self.url,
            client_id,
            protocol=protocol,
            keepalive=keepalive,
            backoff=self.backoff,
            deliver=self._queue.put,
            birth=lambda: self.birth,
        )

    def __repr__(self) -> str:
        return f"MqttTransport({str(self.url)!r}, {self.client_id!r}, connected={self._connection.ready})"

    # -- Transport ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connection.connected

    @property
    def peer(self) -> str:
        return self.url.geturl()  # the password redacted

    @property
    def dropped_messages(self) -> int:
        return self._queue.dropped

    @property
    def reconnections(self) -> int:
        """Connections re-established after a loss."""
        return self._connection.reconnections

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe every pattern given so far; raise :class:`BrokerUnavailable`.

        Raises :class:`~edge_client.errors.BrokerDown` (a :class:`BrokerUnavailable`)
        when the broker cannot be reached or does not answer, which retrying may
        cure, and :class:`BrokerAuthError` when the broker refuses the credentials.
        Once connected, lost connections are re-established in the background.
        """
        self._connection.connect(timeout)

    def close(self) -> None:
        """Disconnect cleanly: the broker discards the will. Idempotent."""
        if self._connection.close():
            self._queue.close()
            log.debug("closed the connection to %s as %r", self.url, self.client_id)

    def subscribe(self, pattern: str, timeout: float | None = None) -> None:
        """Receive messages on topics matching ``pattern``, now and after every reconnection.

        While connected, waits for the broker's SUBACK so that messages
        published afterwards are delivered; while disconnected, the pattern is
        subscribed on the next connection. Raises :class:`SubscribeFailed`.
        """
        check_pattern(pattern)
        self._connection.subscribe(pattern, self.ack_timeout if timeout is None else timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float | None = None) -> None:
        """Publish with QoS 1 and wait for the PUBACK; raise :class:`PublishFailed` so the caller can resend.

        Waits up to ``timeout`` (default ``ack_timeout``) for a lost connection
        to come back before giving up.
        """
        self.publish_many([Message(topic, payload, retain)], timeout=timeout)

    def publish_many(self, messages: Sequence[Message], *, timeout: float | None = None) -> None:
        """Publish several messages (e.g. the chunks of one payload) with QoS 1 and wait for every PUBACK.

        Up to ``PUBLISH_WINDOW`` messages are in flight at once, so a transfer
        costs about one round trip per window instead of one per chunk (a
        6.8 MB model is 71 chunks: 3.5 s of waiting on a 50 ms link otherwise).
        ``timeout`` (default ``ack_timeout``) bounds the wait for each PUBACK.
        """
        for message in messages:
            check_topic(message.topic)
            if len(message.payload) > self.max_payload:
                raise PayloadTooLarge(
                    f"payload of {len(message.payload)} bytes on {message.topic} exceeds max_payload="
                    f"{self.max_payload} bytes of {self.url}; split it with edge_client.chunks first"
                )
        timeout = self.ack_timeout if timeout is None else timeout
        in_flight: deque[tuple[str, paho.MQTTMessageInfo]] = deque()
        for message in messages:
            if len(in_flight) >= PUBLISH_WINDOW:
                self._await_puback(*in_flight.popleft(), timeout)
            in_flight.append((message.topic, self._submit(message, timeout)))
        while in_flight:
            self._await_puback(*in_flight.popleft(), timeout)

    def _submit(self, message: Message, timeout: float) -> paho.MQTTMessageInfo:
        topic = message.topic
        if not self.wait_connected(timeout):
            raise PublishFailed(
                f"not connected to the MQTT broker at {self.url} (reconnecting); the message on {topic} was not "
                "sent. Retry later"
            )
        info = self._connection.client.publish(topic, message.payload, qos=QOS, retain=message.retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise PublishFailed(
                f"{MAX_UNACKED_PUBLISHES} messages to {self.url} are still waiting for their PUBACK; "
                "the broker is slow or unreachable. Retry later"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise PublishFailed(
                f"the connection to {self.url} dropped while publishing on {topic}; paho resends the message after "
                "reconnecting, so a retry may deliver it twice (the protocol layer discards duplicates)"
            )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishFailed(f"publishing on {topic} to {self.url} failed: {paho.error_string(info.rc)}")
        return info

    def _await_puback(self, topic: str, info: paho.MQTTMessageInfo, timeout: float) -> None:
        try:
            info.wait_for_publish(timeout)
            published = info.is_published()
        except (RuntimeError, ValueError) as exc:
            raise PublishFailed(f"publishing on {topic} to {self.url} failed: {exc}; retry") from exc
        if not published:
            raise PublishFailed(
                f"no PUBACK from {self.url} for the message on {topic} within {timeout:g} s; "
                "retry (the broker may get it twice; duplicates are discarded above)"
            )

    def receive(self, timeout: float | None) -> Message | None:
        return self._queue.get(timeout)

    def wait_connected(self, timeout: float | None) -> bool:
        """Wait until connected with every subscription active; False after ``timeout`` or once closed."""
        return self._connection.wait_connected(timeout)


def _make_client(url: BrokerUrl, client_id: str, protocol: str, will: Message | None) -> paho.Client:
    """A paho client set up for ``url`` (credentials, TLS, the will); its callbacks are set by :class:`_Connection`."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=PROTOCOLS[protocol],
        clean_session=True if protocol == "3.1.1" else None,
    )
    # A bug in a callback must not kill the network thread (paho re-raises by default).
    client.suppress_exceptions = True
    client.max_queued_messages_set(MAX_UNACKED_PUBLISHES)
    if url.username is not None:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        try:
            client.tls_set(
                ca_certs=None if url.ca_file is None else str(url.ca_file),
                certfile=None if url.cert_file is None else str(url.cert_file),
                keyfile=None if url.key_file is None else str(url.key_file),
                cert_reqs=ssl.CERT_REQUIRED,
            )
        except (OSError, ValueError) as exc:
            raise BrokerUrlError(
                f"cannot set up TLS for {url}: {exc}; check that ca_file, cert_file and key_file are PEM files"
            ) from exc
    if will is not None:
        check_topic(will.topic)
        client.will_set(will.topic, will.payload, qos=QOS, retain=will.retain)
    return client


# -- the connection's life -----------------------------------------------------------


class _Connection:
    """One paho client's connection: the handshake, reconnection with backoff, and the subscriptions.

    Owns ``client`` and its callbacks, which run on paho's thread: they only
    update the state below under ``_cond`` and hand each message to
    ``deliver``. :class:`MqttTransport` publishes through ``client`` once
    :meth:`wait_connected` returns True.
    """

    def __init__(
        self,
        client: paho.Client,
        url: BrokerUrl,
        client_id: str,
        *,
        protocol: str,
        keepalive: int,
        backoff: Backoff,
        deliver: Callable[[Message], None],
        birth: Callable[[], Message | None] = lambda: None,
    ):
        self.client = client
        self.url = url
        self.client_id = client_id
        self.protocol = protocol
        self.keepalive = keepalive
        self.backoff = backoff
        self._deliver = deliver
        self._birth = birth
        self._cond = threading.Condition()  # guards everything below; callbacks notify through it
        self.reconnections = 0  # connections re-established after a loss
        self._patterns: list[str] = []
        self._session_live = False  # CONNACK accepted, connection not lost since
        self.ready = False  # ... and every pattern (re)subscribed
        self._generation = 0  # successful CONNACKs so far
        self._resubscribe: tuple[int, tuple[str, ...]] | None = None  # SUBACK mid awaited, its patterns
        self._awaited: set[int] = set()  # SUBACK mids subscribe() waits for
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._refusal: BrokerUnavailable | None = None
        self._attempt = 0
        self._started = False  # paho's network thread runs
        self._attempted = False  # connect() was called before (a failed first connection is being retried)
        self._handshaking = False  # connect() drives the first handshake on its own thread
        self._closing = False
        self._closed = False
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        return self.ready and not self._handshaking

    def wait_connected(self, timeout: float | None) -> bool:
        """Wait until connected with every subscription active; False after ``timeout`` or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self.connected or self._closed, timeout)
            return self.connected

    def connect(self, timeout: float) -> None:
        """Connect, subscribe every pattern, then start paho's thread; see :meth:`MqttTransport.connect`."""
        with self._cond:
            if self._closed:
                raise TransportError(f"transport {self.client_id!r} is closed; create a new one to connect again")
            if self._started:
                return
            self._closing = False
            self._refusal = None
        deadline = time.monotonic() + timeout
        if not self._attempted:  # paho refuses to change connect_timeout once a connection was tried
            self.client.connect_timeout = timeout
            self._attempted = True
        # The first handshake (CONNACK, then SUBACK) runs on this thread and paho's network thread
        # starts only afterwards, so a refusal or a dropped connection fails connect() at once
        # instead of entering paho's reconnect loop.
        # Other threads' publish() and subscribe() wait meanwhile: paho would write from their thread.
        with self._cond:
            self._handshaking = True
        try:
            self._open_socket()
            rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and (remaining := deadline - time.monotonic()) > 0:
                rc = self.client.loop(min(0.05, remaining))
                with self._cond:
                    if self.ready or self._refusal is not None:
                        break
            with self._cond:
                ready, refusal = self.ready, self._refusal
            if ready:
                self._started = True
                self.client.loop_start()
            else:
                self.client.disconnect()  # no network thread yet: paho writes DISCONNECT and closes at once
        finally:
            with self._cond:
                self._handshaking = False
                if not self._started:
                    self._session_live = self.ready = False
                self._cond.notify_all()
        if ready:
            log.info("connected to %s as %r", self.url, self.client_id)
            return
        if refusal is not None:
            raise refusal
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(
                f"the MQTT broker at {self.url} closed the connection before accepting it. With mqtts://, "
                "check the client certificate and key (the broker may require them); with mqtt://, check that "
                "the port is not a TLS listener; the broker's log says why"
            )
        raise BrokerDown(
            f"the MQTT broker at {self.url} accepted the TCP connection but did not complete the MQTT handshake "
            f"within {timeout:g} s. Check that an MQTT broker listens there and that the URL scheme matches it "
            "(mqtts:// for a TLS listener, mqtt:// otherwise)"
        )

    def _open_socket(self) -> None:
        """TCP (and TLS) connection and CONNECT packet; raise :class:`BrokerUnavailable`."""
        try:
            if self.protocol == "5":
                self.client.connect(self.url.host, self.url.port, self.keepalive, clean_start=True)
            else:
                self.client.connect(self.url.host, self.url.port, self.keepalive)
        except ssl.SSLError as exc:
            raise BrokerUnavailable(
                f"TLS handshake with the MQTT broker at {self.url} failed: {exc}. "
                "Check ca_file (it must sign the broker's certificate) and the client certificate and key"
            ) from exc
        except OSError as exc:
            raise BrokerDown(
                f"cannot reach the MQTT broker at {self.url}: {exc.strerror or exc}. "
                "Check that the broker is running and listening on that host and port, and any firewall between"
            ) from exc

    def close(self) -> bool:
        """Disconnect cleanly (the broker discards the will); False when already closed."""
        with self._cond:
            if self._closed:
                return False
            self._closed = True
            self._cond.notify_all()
        self._stop()
        return True

    def subscribe(self, pattern: str, timeout: float) -> None:
        """Subscribe ``pattern`` now and after every reconnection, as :meth:`MqttTransport.subscribe` says."""
        with self._cond:
            if pattern in self._patterns:
                return
            self._patterns.append(pattern)
            # A concurrent connect() ends its handshake within its own timeout (see connect()).
            self._cond.wait_for(lambda: not self._handshaking)
            if not self._session_live:
                return  # _on_connect subscribes it
            rc, mid = self.client.subscribe(pattern, qos=QOS)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return  # the connection just dropped: _on_connect subscribes it again
            self._awaited.add(mid)
            generation = self._generation

            def answered() -> bool:
                return mid in self._subacks or not self._session_live or self._generation != generation

            self._cond.wait_for(answered, timeout)
            self._awaited.discard(mid)
            codes = self._subacks.pop(mid, None)
            if codes is None and (not self._session_live or self._generation != generation):
                return  # the connection dropped meanwhile; _on_connect subscribes every pattern
            if codes is None or any(code.is_failure for code in codes):
                self._patterns.remove(pattern)
        if codes is None:
            raise SubscribeFailed(
                f"the MQTT broker at {self.url} did not acknowledge the subscription to {pattern!r} "
                f"within {timeout:g} s; retry, or check the broker's load"
            )
        if any(code.is_failure for code in codes):
            raise SubscribeFailed(
                f"the MQTT broker at {self.url} refused the subscription to {pattern!r} "
                f"({', '.join(map(str, codes))}); check the broker's access control for client {self.client_id!r}"
            )

    # -- lifecycle helpers -------------------------------------------------------------
    def _stop(self) -> None:
        """Disconnect (sending DISCONNECT if connected) and join paho's thread."""
        with self._cond:
            self._closing = True
            started, self._started = self._started, False
        if started:
            self.client.disconnect()
            # Joins within ~1 s even mid-backoff: paho sleeps in 1 s slices and checks its state.
            self.client.loop_stop()
        with self._cond:
            self._session_live = self.ready = False
            self._cond.notify_all()

    def _next_delay(self) -> float:
        """Pick the jittered wait before paho's next reconnection attempt.

        paho's ``reconnect_delay_set`` has no jitter, but setting min = max
        resets its own doubling, so paho waits exactly the delay chosen here.
        Runs on paho's thread, just before it waits.
        """
        delay = self.backoff.delay(self._attempt)
        self._attempt += 1
        # paho annotates the delays as int but computes with them as numbers: sub-second delays work.
        self.client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        return delay

    # -- paho callbacks (paho's thread: no user code, no blocking) ----------------------
    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            refusal = _refusal_error(self.url, self.client_id, reason_code)
            with self._cond:
                self._refusal = refusal
                self._cond.notify_all()
            if not self._handshaking:  # else connect() raises it
                log.warning("%s; retrying with backoff", refusal)
            return
        with self._cond:
            self._generation += 1
            if self._generation > 1:
                self.reconnections += 1
                log.warning("reconnected to %s as %r", self.url, self.client_id)
            self._attempt = 0
            self._refusal = None
            self._session_live = True
            patterns = tuple(self._patterns)
            if patterns:
                rc, mid = client.subscribe([(pattern, QOS) for pattern in patterns])
                # On failure the connection is gone again; the next _on_connect retries.
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._resubscribe = (mid, patterns)
            else:
                self.ready = True
            self._cond.notify_all()
        self._publish_birth(client)

    def _publish_birth(self, client: paho.Client) -> None:
        """Queue the birth message (no waiting for its PUBACK on paho's thread); paho resends it if need be."""
        birth = self._birth()
        if birth is None:
            return
        info = client.publish(birth.topic, birth.payload, qos=QOS, retain=birth.retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:  # the connection is gone again: the next one publishes it
            log.debug("could not publish the birth message on %s: %s", birth.topic, paho.error_string(info.rc))

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if self._resubscribe is not None and mid == self._resubscribe[0]:
                patterns, self._resubscribe = self._resubscribe[1], None
                for pattern, code in zip(patterns, reason_codes, strict=False):
                    if code.is_failure:
                        log.warning("%s refused the subscription to %r: %s", self.url, pattern, code)
                self.ready = True
            elif mid in self._awaited:
                self._subacks[mid] = reason_codes
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._session_live = self.ready = False
            self._resubscribe = None
            self._cond.notify_all()
            if self._closing or self._handshaking:  # closing, or connect() reports the loss itself
                return
            delay = self._next_delay()
        if flags.is_disconnect_packet_from_server:
            why = f"the broker disconnected us: {reason_code}"
        else:
            # paho reports a plain socket loss as "Unspecified error".
            why = "connection lost" if reason_code.value == 128 else str(reason_code)
        log.warning("%r lost the connection to %s (%s); reconnecting in %.2f s", self.client_id, self.url, why, delay)

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        with self._cond:
            if self._closing:
                return
            delay = self._next_delay()
        log.warning("%r cannot reach %s; retrying in %.2f s", self.client_id, self.url, delay)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            log.warning("dropped a message from %s whose topic is not valid UTF-8", self.url)
            return
        self._deliver(Message(topic, bytes(msg.payload), bool(msg.retain)))


def _refusal_error(url: BrokerUrl, client_id: str, reason: ReasonCode) -> BrokerUnavailable:
    """The exception for a CONNACK that refuses the connection, with what to check."""
    said = f"the MQTT broker at {url} refused the connection of {client_id!r}: {reason}"
    if reason.value in _AUTH_REFUSALS:
        return BrokerAuthError(
            f"{said}. Check the user name and password in the URL (mqtt://user:pass@host), or the client "
            "certificate and key for mutual TLS, and that the broker lets this client connect"
        )
    if reason.value == 133:  # client identifier not valid
        return BrokerUnavailable(f"{said}. Choose a shorter client id of letters and digits")
    if reason.value == 132:  # unsupported protocol version
        return BrokerUnavailable(f"{said}. Try the other protocol (protocol='3.1.1' or '5')")
    return BrokerDown(f"{said}. Retry later, or check the broker's log")
