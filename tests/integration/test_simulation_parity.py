"""The same updates give the same global model over a real broker and in the simulator.

The updates are made once by the simulator's own client jobs; the simulator
aggregates them in-process, while scripted boards send the very same frames
through Mosquitto (and amqtt) to a real Coordinator running the same kind of
strategy. The new global weights must agree bit for bit.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from coordinator.client_pool import run_client_job
from coordinator.service import Coordinator, CoordinatorConfig
from coordinator.simulator import FederatedProcess
from coordinator.strategies import FedAdam, RoundConfig
from edge_client.chunks import split
from edge_client.messages import Ack, Presence, RoundAnnouncement
from edge_client.runtime import TrainableModel
from edge_client.topics import Topics
from tests.helpers import separable_binary_data

CLIENTS = 3


def strategy() -> FedAdam:
    config = RoundConfig(epochs=2, lr=0.05, codec="int8-channel")
    return FedAdam(server_lr=0.05, min_fit=CLIENTS, min_available=CLIENTS, round_config=config)


def test_mqtt_coordinator_and_simulator_agree_on_the_same_updates(broker_url, mqtt_client, prefix, tabular, tmp_path):
    x, y = separable_binary_data(CLIENTS * 40, seed=6)
    data = {f"client-{i:03d}": (x[i::CLIENTS], y[i::CLIENTS]) for i in range(CLIENTS)}

    topics = Topics("parity", prefix)
    config = CoordinatorConfig(tabular.model_path, rounds=1, round_timeout=30, federation="parity",
                               topic_prefix=prefix, poll_interval=0.05)  # fmt: skip
    coordinator = Coordinator(config, mqtt_client(broker_url, "coordinator", connect=False), strategy())

    # In-process: the simulator's round, and the update frames its clients produce, in the
    # coordinator's run (updates of another run are rejected as stale_run).
    with FederatedProcess(tabular.model_path, strategy(), seed=11, run_id=coordinator.run_id) as process:
        start = process.initialize()
        jobs = process.client_jobs(start, data, strategy().round_config)  # before next() stores residuals
        simulated, _ = process.next(start, data)
    runtime = TrainableModel.load(tabular.model_path, num_threads=1)  # as the simulator's in-process pool
    payloads = {job.client_id: run_client_job(runtime, job).payload for job in jobs}

    # Over the broker: the real coordinator, and boards that send those frames.
    boards = {}
    for client_id in payloads:
        board = mqtt_client(broker_url, client_id)
        board.subscribe(topics.round)
        board.subscribe(topics.ack(client_id))
        board.publish(topics.presence(client_id), Presence("online", 40).to_bytes(), retain=True)
        boards[client_id] = board
    coordinator.start()
    errors: list[BaseException] = []
    runner = threading.Thread(target=lambda: _run(coordinator, errors), daemon=True)
    runner.start()
    try:
        for client_id, payload in sorted(payloads.items()):  # one at a time: the same order as the simulator
            board = boards[client_id]
            _wait_for(board, topics.round, lambda m, c=client_id: c in RoundAnnouncement.from_bytes(m).selected)
            board.publish_many([_chunk(topics.update(client_id), c) for c in split(payload, 4096)])
            accepted = Ack(1, "accepted", run=coordinator.run_id)
            _wait_for(board, topics.ack(client_id), lambda m, a=accepted: Ack.from_bytes(m) == a)
        runner.join(timeout=30)
        assert not runner.is_alive() and not errors, errors
    finally:
        coordinator.close()
        for client_id, board in boards.items():
            board.publish(topics.presence(client_id), b"", retain=True)  # leave no retained state behind

    for (name, over_mqtt), (_, in_process) in zip(coordinator.global_weights, simulated.weights, strict=True):
        np.testing.assert_array_equal(over_mqtt, in_process, err_msg=name)
    assert not np.array_equal(simulated.weights[0].array, start.weights[0].array)


def _run(coordinator: Coordinator, errors: list[BaseException]) -> None:
    try:
        coordinator.run(threading.Event())
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def _chunk(topic: str, payload: bytes):
    from edge_client.transport import Message

    return Message(topic, payload)


def _wait_for(board, topic: str, accept, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        message = board.receive(timeout=0.2)
        if message is not None and message.topic == topic and message.payload and accept(message.payload):
            return
    raise AssertionError(f"nothing accepted on {topic} within {timeout} s")
