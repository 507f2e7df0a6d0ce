"""The in-process simulator: the devices' training code, the coordinator's strategies,
reproducible from a seed whatever the number of workers, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from coordinator.errors import CoordinatorError
from coordinator.evaluation import ServerEvaluator
from coordinator.metrics import read_jsonl
from coordinator.partition import iid
from coordinator.simulator import FederatedProcess, Simulation, SimulationConfig, build_fedavg_process
from coordinator.strategies import FedAdam, FedAvg, RoundConfig
from coordinator.strategies.dp import DifferentialPrivacy
from edge_client.frames import decode_frame
from tests.helpers import REPO_ROOT, separable_binary_data

# Timings, and bytes_in whose frame headers carry each client's train_seconds digits.
TIMING = ("round_seconds", "aggregate_seconds", "evaluate_seconds", "slowest_client_seconds", "bytes_in")


def client_data(n_clients: int = 4, per_client: int = 48, seed: int = 0) -> dict:
    x, y = separable_binary_data(n_clients * per_client, seed=seed)
    return {f"client-{i:03d}": (x[i::n_clients], y[i::n_clients]) for i in range(n_clients)}


def same_weights(a, b) -> bool:
    return all(na == nb and np.array_equal(wa, wb) for (na, wa), (nb, wb) in zip(a, b, strict=True))


def fedadam(codec: str = "float32") -> FedAdam:
    return FedAdam(server_lr=0.05, round_config=RoundConfig(epochs=2, lr=0.05, codec=codec))


def test_fedavg_process_initialize_and_next(tabular):
    data = client_data()
    with build_fedavg_process(tabular.model_path, client_lr=0.05, server_lr=1.0, epochs=2) as process:
        state = process.initialize()
        assert state.round == 0 and same_weights(state.weights, tabular.runtime().get_weights())
        new, metrics = process.next(state, list(data.values()))
        again, _ = process.next(state, list(data.values()))
    assert new.round == 1 and same_weights(new.weights, again.weights), "next() must be a function of its inputs"
    assert not same_weights(new.weights, state.weights)
    assert (metrics.clients_selected, metrics.clients_answered, metrics.num_examples) == (4, 4, 192)
    assert metrics.bytes_in > 0 and metrics.bytes_out > 0 and metrics.train_loss is not None


def test_textbook_fedavg_is_the_weighted_mean_of_the_clients_models(tabular):
    """Server SGD at 1.0 over deltas = the example-weighted average of the local models."""
    data = client_data(3)
    data["client-002"] = (data["client-002"][0][:10], data["client-002"][1][:10])  # unequal sizes
    with build_fedavg_process(tabular.model_path, client_lr=0.05, epochs=1) as process:
        state = process.initialize()
        jobs = process.client_jobs(state, data, RoundConfig(epochs=1, lr=0.05))
        locals_ = [decode_frame(_run(tabular, job).payload) for job in jobs]
        new, _ = process.next(state, data)
    total = sum(f.num_examples for f in locals_)
    for k, (name, start) in enumerate(state.weights):
        expected = start + sum(f.num_examples * f.tensors[k].array.astype(np.float64) for f in locals_) / total
        np.testing.assert_allclose(new.weights[k].array, expected, rtol=1e-6, atol=1e-7, err_msg=name)


def _run(tabular, job):
    from coordinator.client_pool import run_client_job

    return run_client_job(tabular.runtime(), job)


def test_workers_do_not_change_the_result(tabular):
    data = client_data()
    results = []
    for workers in (0, 2):
        with FederatedProcess(tabular.model_path, fedadam("topk:0.2"), workers=workers, seed=5) as process:
            state = process.initialize()
            for _ in range(2):  # round 2 uses the residuals and server moments of round 1
                state, metrics = process.next(state, data)
        results.append((state, metrics))
    (a, ma), (b, mb) = results
    assert same_weights(a.weights, b.weights)
    assert a.strategy_state.keys() == b.strategy_state.keys()
    assert all(np.array_equal(a.strategy_state[k], b.strategy_state[k]) for k in a.strategy_state)
    assert ma.train_loss == mb.train_loss  # (bytes differ by the digits of each train_seconds)


def test_next_trains_each_round_at_the_decayed_lr(tabular):
    data = client_data()
    with build_fedavg_process(tabular.model_path, client_lr=0.2, lr_decay=0.25) as decayed:
        one, _ = decayed.next(decayed.initialize(), data)
        two, metrics = decayed.next(one, data)
    assert metrics.client_lr == pytest.approx(0.05)
    with build_fedavg_process(tabular.model_path, client_lr=0.2) as constant:
        assert same_weights(constant.next(constant.initialize(), data)[0].weights, one.weights)
        explicit, _ = constant.next(one, data, RoundConfig(lr=0.2 * 0.25))
        undecayed, _ = constant.next(one, data)
    assert same_weights(explicit.weights, two.weights) and not same_weights(undecayed.weights, two.weights)


def test_different_seeds_train_differently(tabular):
    data = client_data()
    out = []
    for seed in (0, 1):
        with build_fedavg_process(tabular.model_path, client_lr=0.05, seed=seed) as process:
            out.append(process.next(process.initialize(), data)[0].weights)
    assert not same_weights(*out)


def test_compressed_updates_move_fewer_bytes(tabular):
    data = client_data()
    sizes = {}
    for codec in ("float32", "int8", "topk:0.1"):
        with build_fedavg_process(tabular.model_path, client_lr=0.05, codec=codec) as process:
            sizes[codec] = process.next(process.initialize(), data)[1].bytes_in
    # A tiny model: the frame header is a good part of each update, so only a factor of 2 here.
    assert sizes["int8"] < sizes["float32"] / 2 and sizes["topk:0.1"] < sizes["float32"] / 2


def test_clients_that_diverge_are_rejected_with_a_reason(tabular):
    data = client_data(2)
    x, y = data["client-001"]
    data["client-001"] = (x * np.nan, y)  # a sensor gone bad
    with build_fedavg_process(tabular.model_path, client_lr=0.05) as process:
        state = process.initialize()
        with pytest.raises(CoordinatorError, match="no client sent a usable update"):
            process.next(state, {"client-001": data["client-001"]})
        _, metrics = process.next(state, data)
    assert metrics.clients_answered == 1 and metrics.rejected_reasons == {"diverged": 1}


def _simulation(tabular, tmp_path, rounds: int) -> Simulation:
    x, y = separable_binary_data(200, seed=2)
    evaluate = ServerEvaluator(tabular.tflite, tabular.manifest, x[:64], y[:64])
    inner = FedAvg(fraction_fit=0.5, round_config=RoundConfig(lr=0.05, codec="int8"), evaluate_fn=evaluate)
    strategy = DifferentialPrivacy(inner, clip_norm=5.0, noise_multiplier=0.1, seed=1)
    config = SimulationConfig(tabular.model_path, rounds=rounds, seed=3, out=tmp_path / "run")
    return Simulation(config, strategy, client_data(6, 20))


def test_a_resumed_simulation_ends_exactly_where_an_uninterrupted_one_does(tabular, tmp_path):
    whole = _simulation(tabular, tmp_path / "whole", 3)
    whole.run()
    first = _simulation(tabular, tmp_path / "parts", 2)
    first.run()
    resumed = _simulation(tabular, tmp_path / "parts", 3)
    assert resumed.completed_round == 2
    # The same run goes on, as a resumed MQTT coordinator's; another --out is another run.
    assert resumed.process.run_id == first.process.run_id != whole.process.run_id
    jobs = resumed.process.client_jobs(resumed.state, resumed.datasets, RoundConfig())
    assert decode_frame(jobs[0].global_frame).run == first.process.run_id
    resumed.run()
    assert same_weights(whole.state.weights, resumed.state.weights)
    a = read_jsonl(tmp_path / "whole" / "run" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "parts" / "run" / "metrics.jsonl")
    assert [r["round"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in TIMING:
            ra.pop(key), rb.pop(key)
        assert ra == rb
    assert a[-1]["dp_epsilon"] > a[0]["dp_epsilon"] > 0 and a[-1]["clients_selected"] == 3
    assert a[-1]["test_accuracy"] is not None
    # int8 is lossy: the sampled clients keep error-feedback residuals in their own state directories.
    assert len(list((tmp_path / "whole" / "run" / "clients").glob("client-*/residuals.npz"))) >= 3


def test_too_few_clients_for_the_strategy(tabular, tmp_path):
    config = SimulationConfig(tabular.model_path, rounds=1)
    with pytest.raises(CoordinatorError, match="at least 5"):
        Simulation(config, FedAvg(min_fit=1, min_available=5), client_data(2))


def test_a_short_mnist_simulation_learns(mnist_cnn, mnist_data, tmp_path):
    """A few clients, a few rounds, the bundled subset's size: stated accuracy 0.85."""
    from coordinator.datasets import load_bundled_mnist, to_model_input

    data = load_bundled_mnist()
    x, y = to_model_input(data.x_train), data.y_train.astype(np.int32)
    parts = iid(len(x), 4, 0)
    evaluate = ServerEvaluator(mnist_cnn.tflite, mnist_cnn.manifest, to_model_input(data.x_test), data.y_test)
    strategy = FedAvg(round_config=RoundConfig(epochs=1, lr=0.05), evaluate_fn=evaluate)
    config = SimulationConfig(mnist_cnn.model_path, rounds=3, workers=2, seed=0)
    history = Simulation(config, strategy, {f"client-{i:03d}": (x[p], y[p]) for i, p in enumerate(parts)}).run()
    assert [m.round for m in history] == [1, 2, 3]
    assert history[-1].test_accuracy >= 0.85, [m.test_accuracy for m in history]


def test_cli_runs_resumes_and_plots(tabular, tmp_path):
    x, y = separable_binary_data(240, seed=4)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    out = tmp_path / "run"
    base = [sys.executable, "-m", "coordinator.cli.simulate", "--model", str(tabular.model_path), "--data", str(data),
            "--clients", "4", "--workers", "0", "--lr", "0.05", "--out", str(out), "--no-progress"]  # fmt: skip

    def run(*extra):
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)

    first = run("--rounds", "2", "--strategy", "fedavgm", "--codec", "int8-channel")
    assert first.returncode == 0, first.stderr
    assert "rounds completed: 2" in first.stdout and (out / "metrics.png").stat().st_size > 0
    again = run("--rounds", "3", "--strategy", "fedavgm", "--codec", "int8-channel")
    assert again.returncode == 0 and "resuming after round 2" in again.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3] and all(r["test_accuracy"] is not None for r in records)
    assert json.dumps(records)  # plain JSON Lines, as the coordinator writes

    cmd = [sys.executable, "-m", "coordinator.plots", str(out), str(out), "--label", "a", "--label", "b", "--out",
           str(tmp_path / "cmp.png")]  # fmt: skip
    plot = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "cmp.png").stat().st_size > 0


def test_cli_errors_are_one_line(tabular, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.cli.simulate", "--model", str(tabular.model_path), "--data", "nope.npz",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.returncode == 1 and "litefed-simulate: error:" in proc.stderr and "nope.npz" in proc.stderr
    cmd = [sys.executable, "-m", "coordinator.cli.simulate", "--dp-noise", "1", "--model", str(tabular.model_path)]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "--dp-noise needs --dp-clip" in bad.stderr


def test_a_dead_worker_is_a_clear_error(tabular):
    with FederatedProcess(tabular.model_path, FedAvg(), workers=1) as process:
        state = process.initialize()
        worker = process._pool._executor.submit(os.getpid).result(timeout=60)
        os.kill(worker, signal.SIGKILL)  # as the kernel's OOM killer would
        with pytest.raises(CoordinatorError, match="worker process died"):
            process.next(state, client_data(2))
