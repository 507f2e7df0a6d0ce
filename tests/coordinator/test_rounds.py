"""The round engine on its own: a two-tensor "model", hand-made frames and a recording strategy.

No converted model is needed: the engine knows a model only by its tensor
specs and its hash, so every check here runs in milliseconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from coordinator.checkpoint import ServerState, load_checkpoint, save_checkpoint
from coordinator.errors import AggregationError, CoordinatorError
from coordinator.metrics import RoundMetrics, read_jsonl
from coordinator.rounds import RoundEngine
from coordinator.strategies import ClientUpdate, FedAvg, RoundConfig, Strategy
from edge_client.frames import Frame, decode_frame, encode_frame
from edge_client.messages import Ack, new_run_id
from edge_client.weights import NamedArray, TensorSpec, Weights

SHA = "ab" * 32
SPECS = (TensorSpec("w", (2,), "float32"), TensorSpec("b", (1,), "float32"))
RUN = "0123456789abcdef"


def weights(w: float = 0.0, b: float = 0.0) -> Weights:
    return [NamedArray("w", np.full(2, w, np.float32)), NamedArray("b", np.full(1, b, np.float32))]


def update(client: str, delta: float = 0.1, n: int = 10, round_: int = 1, run: str = RUN, **changes) -> Frame:
    fields = dict(
        kind="update",
        round=round_,
        model_sha256=SHA,
        tensors=weights(delta, delta),
        client_id=client,
        num_examples=n,
        metrics={"loss": 0.5, "train_seconds": n / 10},
        run=run,
    )
    fields.update(changes)
    return Frame(**fields)


class _Sum:
    """Adds every delta to the global weights; ``finish`` counts the round as aggregated."""

    def __init__(self, strategy: Recording, global_weights: Weights):
        self.strategy, self.global_weights, self.deltas = strategy, global_weights, []

    def add(self, update: ClientUpdate) -> None:
        if update.num_examples == 13:
            raise AggregationError("13 examples are unlucky", reason="outlier")
        self.deltas.append(update.delta)

    @property
    def count(self) -> int:
        return len(self.deltas)

    def finish(self) -> Weights:
        self.strategy.calls.append("finish")
        if self.strategy.refuse:
            raise AggregationError("refused on purpose")
        self.strategy.aggregated += 1
        return [
            NamedArray(name, array + sum(d[k].array for d in self.deltas))
            for k, (name, array) in enumerate(self.global_weights)
        ]


class Recording(Strategy):
    """Records the order of its hooks; its state is the number of rounds aggregated."""

    def __init__(self, refuse: bool = False):
        self.calls: list[str] = []
        self.aggregated, self.refuse = 0, refuse

    def configure_round(
        self, server_round: int, available: Sequence[str], rng: np.random.Generator
    ) -> tuple[list[str], RoundConfig]:
        return list(available), RoundConfig()

    def begin_aggregation(self, server_round: int, global_weights: Weights) -> _Sum:
        self.calls.append("begin")
        return _Sum(self, global_weights)

    def privacy_spent(self) -> float:
        self.calls.append("privacy")
        return float(self.aggregated)  # 0 if asked before the aggregate of the round

    def evaluate(self, server_round: int, weights: Weights) -> dict[str, float]:
        self.calls.append("evaluate")
        return {"loss": float(weights[0].array[0]), "accuracy": 0.5}

    def state_dict(self) -> dict[str, np.ndarray]:
        self.calls.append("state_dict")
        return {"aggregated": np.array([self.aggregated])}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        count = int(state["aggregated"][0]) if "aggregated" in state else 0
        if count < 0:
            raise CoordinatorError("a negative round count")
        self.aggregated = count


def engine(strategy: Strategy | None = None, state: ServerState | None = None, **options) -> RoundEngine:
    state = state or ServerState(0, weights(), {}, RUN)
    return RoundEngine(strategy or FedAvg(), SPECS, SHA, state, **options)


# -- accepting updates ---------------------------------------------------------------------


def test_an_update_is_validated_folded_in_and_counted():
    rounds = engine()
    open_ = rounds.open_round()
    assert rounds.accept(encode_frame(update("c1", 0.1, 10)), "c1") == Ack(1, "accepted", run=RUN)
    assert rounds.accept(update("c2", 0.4, 30), "c2") == Ack(1, "accepted", run=RUN)  # a decoded frame
    assert open_.accepted == {"c1", "c2"} and open_.aggregation.count == 2
    assert (open_.metrics.clients_answered, open_.metrics.num_examples) == (2, 40)
    assert open_.metrics.train_loss == pytest.approx(0.5) and open_.metrics.slowest_client_seconds == 3.0
    metrics = rounds.finish_round(bytes_in=7, bytes_out=9)
    assert (metrics.bytes_in, metrics.bytes_out) == (7, 9)
    # FedAvg: the example-weighted mean delta, (10 * 0.1 + 30 * 0.4) / 40.
    np.testing.assert_allclose(rounds.state.weights[0].array, 0.325, rtol=1e-6)


def test_a_second_update_of_a_client_is_a_duplicate_and_counts_once():
    rounds = engine()
    open_ = rounds.open_round()
    rounds.accept(update("c1"), "c1")
    assert rounds.accept(update("c1", 5.0), "c1") == Ack(1, "duplicate", run=RUN)
    assert open_.aggregation.count == 1 and open_.metrics.clients_answered == 1
    assert open_.metrics.clients_rejected == 0


@pytest.mark.parametrize(
    ("make", "reason", "ack_round", "ack_run"),
    [
        (lambda: encode_frame(update("c1", round_=0)), "stale_round", 0, RUN),
        (lambda: encode_frame(update("c1", run="fedcba9876543210")), "stale_run", 1, "fedcba9876543210"),
        (lambda: encode_frame(update("c1", model_sha256="cd" * 32)), "unknown_model", 1, RUN),
        (lambda: encode_frame(update("c1", tensors=weights()[:1])), "bad_tensors", 1, RUN),
        (lambda: b"garbage" * 10, "bad_magic", 1, RUN),  # undecodable: the engine's round and run
        (lambda: encode_frame(update("c1", n=13)), "outlier", 1, RUN),  # the aggregation's own reason
    ],
)
def test_a_refused_update_gets_its_reason_and_touches_nothing(make, reason, ack_round, ack_run):
    rounds = engine(Recording())
    open_ = rounds.open_round()
    assert rounds.accept(make(), "c1") == Ack(ack_round, "rejected", reason, ack_run)
    assert open_.aggregation.count == 0 and open_.accepted == set()
    assert open_.metrics.rejected_reasons == {reason: 1} and open_.metrics.clients_answered == 0
    assert open_.metrics.late_updates == (1 if reason == "stale_round" else 0)


def test_only_selected_clients_are_taken_when_a_selection_is_given():
    rounds = engine()
    open_ = rounds.open_round()
    assert rounds.accept(update("c9"), "c9", selected={"c1"}) == Ack(1, "rejected", "not_selected", RUN)
    assert rounds.accept(update("c1"), "c1", selected={"c1"}).status == "accepted"
    assert open_.metrics.rejected_reasons == {"not_selected": 1}


# -- hostile updates (issue 11): bounds the engine enforces after validate_frame -----------------


def test_num_examples_is_capped_and_never_reaches_the_aggregation():
    rounds = engine(Recording(), max_examples=1000)
    open_ = rounds.open_round()
    # 10**20 is within the JSON bounds (24 digits), so it reaches the engine, which refuses it.
    for n in (10**20, 1001):
        assert rounds.accept(encode_frame(update("c1", n=n)), "c1") == Ack(1, "rejected", "too_many_examples", RUN)
    assert rounds.accept(update("c1", n=1000), "c1").status == "accepted"
    assert open_.aggregation.count == 1 and open_.metrics.num_examples == 1000
    assert open_.metrics.rejected_reasons == {"too_many_examples": 2}


def test_an_update_may_not_claim_more_examples_than_its_client_reported():
    rounds = engine()
    open_ = rounds.open_round()
    ack = rounds.accept(update("c1", n=11), "c1", selected={"c1"}, reported_examples=10)
    assert ack == Ack(1, "rejected", "too_many_examples", RUN)
    assert rounds.accept(update("c1", n=10), "c1", selected={"c1"}, reported_examples=10).status == "accepted"
    assert open_.metrics.rejected_reasons == {"too_many_examples": 1} and open_.metrics.num_examples == 10


def test_the_codec_must_be_one_the_round_announced():
    rounds = engine()
    open_ = rounds.open_round()
    assert rounds.accept(update("c1", codec="float16"), "c1").status == "accepted"  # no codec announced: any
    open_.codecs.add("float32")
    assert rounds.accept(update("c2", codec="float16"), "c2") == Ack(1, "rejected", "wrong_codec", RUN)
    assert rounds.accept(update("c2"), "c2").status == "accepted"
    assert open_.metrics.rejected_reasons == {"wrong_codec": 1}


def test_an_optional_norm_bound_refuses_larger_updates():
    rounds = engine(max_update_norm=1.0)
    open_ = rounds.open_round()
    # update(delta) sets the three values (w: 2, b: 1) to delta: norm = delta * sqrt(3).
    assert rounds.accept(update("c1", 0.6), "c1") == Ack(1, "rejected", "norm_too_large", RUN)
    assert rounds.accept(update("c1", 0.5), "c1").status == "accepted"
    assert open_.metrics.rejected_reasons == {"norm_too_large": 1}
    assert engine().max_update_norm is None  # no bound by default


def test_bounds_come_after_the_frame_checks_and_a_duplicate_stays_a_duplicate():
    rounds = engine(max_update_norm=1.0)
    open_ = rounds.open_round()
    open_.codecs.add("float32")
    stale = update("c1", 5.0, round_=0, codec="float16")  # stale, in the wrong codec and too large
    assert rounds.accept(stale, "c1").reason == "stale_round"
    rounds.accept(update("c1"), "c1")
    assert rounds.accept(update("c1"), "c1", selected={"c2"}) == Ack(1, "duplicate", run=RUN)


def test_an_update_between_rounds_is_stale_and_counted_nowhere():
    rounds = engine()
    ack = rounds.accept(update("c1", round_=1), "c1")
    assert ack == Ack(1, "rejected", "stale_round", RUN) and rounds.current is None


def test_aggregation_errors_carry_a_reason():
    assert AggregationError("x").reason == "bad_tensors"
    assert AggregationError("x", reason="outlier").reason == "outlier"
    metrics = RoundMetrics(round=1)
    metrics.reject("stale_round")
    metrics.reject("bad_magic")
    assert (metrics.clients_rejected, metrics.late_updates) == (2, 1)


# -- finishing a round ---------------------------------------------------------------------


def test_finish_round_runs_its_steps_in_the_documented_order(tmp_path):
    strategy = Recording()
    seen = {}

    def on_round(metrics: RoundMetrics) -> None:
        # Everything that reports the round comes after its checkpoint.
        seen["checkpoint"] = load_checkpoint(tmp_path / "ckpt", SHA).round
        seen["lines"] = [line["round"] for line in read_jsonl(tmp_path / "metrics.jsonl")]
        seen["history"] = list(rounds.history)

    rounds = engine(
        strategy, checkpoint_dir=tmp_path / "ckpt", metrics_path=tmp_path / "metrics.jsonl", on_round=on_round
    )
    rounds.open_round()
    rounds.accept(update("c1", 0.25), "c1")
    strategy.calls.clear()
    metrics = rounds.finish_round(bytes_in=1, bytes_out=2)
    assert strategy.calls == ["finish", "privacy", "evaluate", "state_dict"]
    assert metrics.dp_epsilon == 1.0  # asked after the aggregate, which accounts the round
    assert metrics.test_loss == pytest.approx(0.25)  # the new model was evaluated
    assert seen == {"checkpoint": 1, "lines": [1], "history": [metrics]}
    assert rounds.current is None and rounds.completed_round == 1
    assert rounds.state.strategy_state["aggregated"][0] == 1 and rounds.state.run_id == RUN
    assert metrics.round_seconds >= metrics.aggregate_seconds + metrics.evaluate_seconds


def test_a_refused_aggregate_keeps_the_global_model_and_the_round_completes(tmp_path):
    rounds = engine(Recording(refuse=True), metrics_path=tmp_path / "metrics.jsonl")
    rounds.open_round()
    rounds.accept(update("c1", 1.0), "c1")
    metrics = rounds.finish_round(0, 0)
    assert metrics.aggregation_error == "refused on purpose" and rounds.completed_round == 1
    np.testing.assert_array_equal(rounds.state.weights[0].array, weights()[0].array)
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["aggregation_error"] == "refused on purpose"


def test_finish_round_needs_an_open_round():
    with pytest.raises(CoordinatorError, match="open_round"):
        engine().finish_round(0, 0)


# -- the global frame ------------------------------------------------------------------------


def test_the_global_frame_is_encoded_once_per_state_and_names_round_and_run():
    rounds = engine()
    first = rounds.global_frame
    assert rounds.global_frame is first  # not encoded again for the same state
    frame = decode_frame(first)
    assert (frame.kind, frame.round, frame.run, frame.model_sha256) == ("global", 1, RUN, SHA)
    rounds.open_round()
    assert rounds.global_frame is first  # the open round's: the state has not moved
    rounds.accept(update("c1", 0.5), "c1")
    rounds.finish_round(0, 0)
    after = decode_frame(rounds.global_frame)
    assert after.round == 2
    np.testing.assert_allclose(after.tensors[0].array, 0.5)
    other = ServerState(7, weights(1.0), {}, RUN)
    assert decode_frame(rounds.global_frame_of(other)).round == 8


def test_a_state_must_name_its_run():
    with pytest.raises(CoordinatorError, match="run id"):
        engine(state=ServerState(0, weights()))


# -- state and restore -----------------------------------------------------------------------


def test_reset_loads_the_strategy_state_and_drops_the_open_round():
    strategy = Recording()
    rounds = engine(strategy)
    rounds.open_round()
    rounds.reset(ServerState(4, weights(2.0), {"aggregated": np.array([4])}, RUN))
    assert rounds.current is None and rounds.completed_round == 4 and strategy.aggregated == 4
    with pytest.raises(CoordinatorError, match="negative"):
        rounds.reset(ServerState(5, weights(), {"aggregated": np.array([-1])}, RUN))
    assert rounds.completed_round == 4  # a refused state changes nothing


def test_restore_resumes_the_run_its_weights_and_its_strategy(tmp_path):
    saved = ServerState(3, weights(1.5), {"aggregated": np.array([3])}, RUN)
    save_checkpoint(tmp_path, SHA, saved)
    strategy = Recording()
    rounds = engine(strategy, state=ServerState(0, weights(), {}, new_run_id()), checkpoint_dir=tmp_path)
    state = rounds.restore()
    assert state is rounds.state and (state.round, state.run_id) == (3, RUN) and strategy.aggregated == 3
    np.testing.assert_array_equal(state.weights[0].array, saved.weights[0].array)
    assert engine(checkpoint_dir=tmp_path / "empty").restore() is None
    assert engine().restore() is None  # no checkpoint directory


def test_a_checkpoint_the_strategy_refuses_is_a_one_line_error(tmp_path):
    save_checkpoint(tmp_path, SHA, ServerState(2, weights(), {"aggregated": np.array([-1])}, RUN))
    with pytest.raises(CoordinatorError, match=r"cannot resume from .*: a negative round count; use another --out"):
        engine(Recording(), checkpoint_dir=tmp_path).restore()


def test_a_checkpoint_without_run_id_goes_on_under_the_engines_run(tmp_path, caplog):
    save_checkpoint(tmp_path, SHA, ServerState(2, weights(0.5)))  # as written before runs had ids
    assert json.loads((tmp_path / "checkpoint.json").read_text())["run"] == ""
    run = new_run_id()
    rounds = engine(state=ServerState(0, weights(), {}, run), checkpoint_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="coordinator.rounds"):
        state = rounds.restore()
    assert (state.round, state.run_id) == (2, run) and "has no run id" in caplog.text
    assert load_checkpoint(tmp_path, SHA).run_id == run  # saved at once: kept from now on
