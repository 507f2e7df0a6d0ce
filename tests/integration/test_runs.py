"""A federation run twice: the second run of the same model gets its updates from round 1.

Real ``litefed-client`` processes on a real Mosquitto keep running (and keep
their state directories) between two coordinator runs with different
``--out`` directories, as when an operator starts a fresh experiment. Before
runs had ids the boards ignored every round "at or below" the last one they
had trained, and the second run waited out its deadlines and failed.
"""

from __future__ import annotations

import pytest

from tests.integration.test_federation import Background, Federation

pytestmark = pytest.mark.integration

CLIENTS = 2
ROUNDS = 2
ROUND_TIMEOUT = 20.0  # a deadline wait-out would show as attempts > 1 (and 3 attempts fail the run)


def test_a_second_run_with_the_same_model_gets_updates_at_once(mosquitto_broker, tabular, tmp_path):
    fed = Federation(mosquitto_broker.url, tabular, tmp_path, clients=CLIENTS, federation="runs")
    runs = []
    try:
        for c in fed.clients:
            fed.wait_presence(c.client_id, "online")
        for out in ("first", "second"):
            coordinator = fed.coordinator(ROUNDS, CLIENTS, CLIENTS, ROUND_TIMEOUT, out=tmp_path / out)
            runs.append(coordinator)
            coordinator.start()
            assert Background(coordinator).join(3 * ROUNDS * ROUND_TIMEOUT + 60) is None
            coordinator.close()
        first, second = runs
        assert first.run_id != second.run_id
        for coordinator in runs:
            history = coordinator.history
            assert [m.round for m in history] == list(range(1, ROUNDS + 1))
            # Every selected board answered in the first attempt: no round waited for its deadline.
            assert all(m.attempts == 1 and m.clients_answered == m.clients_selected == CLIENTS for m in history)
            assert all(m.clients_rejected == 0 for m in history)
    finally:
        for coordinator in runs:
            coordinator.close()
        fed.close()
    for c in fed.clients:  # each board said why it dropped the first run's state, and did not crash
        text = c.log_path.read_text()
        assert f"joining run {second.run_id}" in text and f"leaving run {first.run_id}" in text, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
