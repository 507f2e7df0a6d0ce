"""Riding out broker outages: the coordinator's publishes and connection retried while the broker is away."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from coordinator.errors import CoordinatorError
from edge_client.broker_url import Backoff
from edge_client.errors import BrokerDown, PublishFailed
from edge_client.transport import Transport

log = logging.getLogger(__name__)


OUTAGE_LOG_INTERVAL = 60.0  # seconds between two "the broker is still away" lines
OUTAGE_BACKOFF = Backoff(initial=0.25, maximum=5.0)  # between two tries (MqttTransport waits ack_timeout in each)


class BrokerOutage:
    """Carries the coordinator's publishes through broker outages, up to ``timeout`` seconds each.

    A publish that fails because the broker is away (:class:`PublishFailed`),
    or a connection attempt it cannot answer yet (:class:`BrokerDown`), is
    tried again, with backoff, until it goes through: logged once, then once
    a minute. After ``timeout`` seconds of failures it raises
    :class:`CoordinatorError` naming the broker; once :attr:`stop` is set it
    gives up at once (the caller's loop stops too). :attr:`outages` counts the
    outages ridden out and the transport's reconnections, so that a round can
    tell whether the broker was away during an attempt.
    """

    def __init__(self, transport: Transport, timeout: float):
        self.transport, self.timeout = transport, timeout
        self.broker = transport.peer
        self.stop: threading.Event | None = None
        self.outages = 0
        self._reconnections = transport.reconnections

    def reconnected(self) -> bool:
        """True once for each reconnection of the transport since the last call: the retained state may be gone."""
        seen, self._reconnections = self._reconnections, self.transport.reconnections
        if seen == self._reconnections:
            return False
        self.outages += 1
        return True

    def send(self, what: str, action: Callable[[], None]) -> bool:
        """Run ``action`` (``what`` names it), retrying while the broker is away; False if stopped first."""
        started, logged, attempt = None, 0.0, 0
        while True:
            try:
                action()
            except (PublishFailed, BrokerDown) as exc:  # BrokerDown: connecting while it is away
                now = time.monotonic()
                if started is None:
                    started = logged = now
                    log.warning("%s failed: %s. Retrying while the broker at %s is away, for up to %.0f s "
                                "(--broker-outage-timeout)", what, exc, self.broker, self.timeout)  # fmt: skip
                elif now - logged >= OUTAGE_LOG_INTERVAL:
                    logged = now
                    log.warning("the broker at %s has been away for %.0f s; still retrying", self.broker, now - started)
                if now - started >= self.timeout:
                    raise CoordinatorError(
                        f"the MQTT broker at {self.broker} has been unreachable for {now - started:.0f} s "
                        f"(--broker-outage-timeout {self.timeout:g}); check that it runs and that this host reaches "
                        "it, then start the coordinator again: it resumes from its checkpoint"
                    ) from exc
                if self.stop is not None and self.stop.is_set():
                    log.warning("stopping while the broker at %s is away: %s was not done", self.broker, what)
                    return False
                delay, attempt = OUTAGE_BACKOFF.delay(attempt), attempt + 1
                if self.stop is None:
                    time.sleep(delay)
                else:
                    self.stop.wait(delay)
                continue
            if started is not None:
                self.outages += 1
                log.warning("the broker at %s is back after %.0f s", self.broker, time.monotonic() - started)
            return True
