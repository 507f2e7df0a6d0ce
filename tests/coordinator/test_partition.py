"""Partitioners: coverage, reproducibility, label skew, and the --partition spec."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import PartitionError
from coordinator.partition import PartitionSpec, dirichlet, iid, parse_partition, shards


def balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """MNIST-like labels: every class equally often, in shuffled order."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


def assert_exact_cover(parts: list[np.ndarray], num_examples: int) -> None:
    """Every index in [0, num_examples) appears exactly once; each part is sorted ints."""
    for part in parts:
        assert part.dtype.kind == "i"
        assert np.all(np.diff(part) > 0)
    counts = np.bincount(np.concatenate(parts), minlength=num_examples) if parts else np.zeros(0)
    assert len(counts) == num_examples
    np.testing.assert_array_equal(counts, 1)


def label_entropy(labels: np.ndarray, part: np.ndarray, num_classes: int) -> float:
    p = np.bincount(labels[part], minlength=num_classes) / len(part)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def same_parts(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# -- iid ---------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(data=st.data(), num_clients=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_iid_covers_every_index_once_with_balanced_sizes(data, num_clients, seed):
    num_examples = data.draw(st.integers(num_clients, 500))
    parts = iid(num_examples, num_clients, seed)
    assert len(parts) == num_clients
    assert_exact_cover(parts, num_examples)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_iid_is_reproducible_and_shuffled():
    assert same_parts(iid(1000, 7, 3), iid(1000, 7, 3))
    assert same_parts(iid(1000, 7, np.random.default_rng(3)), iid(1000, 7, 3))
    assert not same_parts(iid(1000, 7, 3), iid(1000, 7, 4))
    first = iid(1000, 2, 0)[0]
    assert not np.array_equal(first, np.arange(500))  # not simply the first half


def test_iid_needs_an_example_per_client():
    with pytest.raises(PartitionError, match="use fewer clients"):
        iid(3, 4, 0)
    with pytest.raises(PartitionError, match="num_clients must be at least 1"):
        iid(3, 0, 0)


# -- shards -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    num_clients=st.integers(1, 20),
    shards_per_client=st.integers(1, 4),
    num_classes=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_cover_every_index_once(data, num_clients, shards_per_client, num_classes, seed):
    num_examples = data.draw(st.integers(num_clients * shards_per_client, 400))
    labels = np.random.default_rng(seed).integers(0, num_classes, num_examples)
    parts = shards(labels, num_clients, shards_per_client, seed)
    assert len(parts) == num_clients
    assert_exact_cover(parts, num_examples)
    sizes = [len(p) for p in parts]  # each client gets k shards whose sizes differ by at most 1
    assert max(sizes) - min(sizes) <= shards_per_client


def test_shards_mnist_like_gives_each_client_at_most_k_labels():
    # 6,000 examples per class, 100 clients x 2 shards of 300: 20 shards per class.
    labels = balanced_labels(10, 6000)
    parts = shards(labels, 100, 2, np.random.default_rng(0))
    assert all(len(p) == 600 for p in parts)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert max(distinct) <= 2
    # A shard is contiguous in sorted order: each client's examples of one label come in runs of 300.
    for part in parts:
        _, counts = np.unique(labels[part], return_counts=True)
        assert set(counts.tolist()) <= {300, 600}


def test_shards_is_reproducible_and_depends_on_the_seed():
    labels = balanced_labels(10, 100)
    assert same_parts(shards(labels, 10, 2, 5), shards(labels, 10, 2, 5))
    assert not same_parts(shards(labels, 10, 2, 5), shards(labels, 10, 2, 6))


def test_shards_errors():
    with pytest.raises(PartitionError, match="cannot fill 12 shards"):
        shards(np.zeros(10), 6, 2, 0)
    with pytest.raises(PartitionError, match="at least 1, got 0"):
        shards(np.zeros(10), 2, 0, 0)
    with pytest.raises(PartitionError, match=r"\(1-D\), got shape \(5, 2\)"):
        shards(np.zeros((5, 2)), 2, 1, 0)


# -- dirichlet --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    num_clients=st.integers(1, 15),
    alpha=st.sampled_from([0.3, 1.0, 10.0]),
    num_classes=st.integers(1, 6),
    per_class=st.integers(20, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_every_index_once(num_clients, alpha, num_classes, per_class, seed):
    labels = balanced_labels(num_classes, per_class, seed)
    parts = dirichlet(labels, num_clients, alpha, seed, min_size=0)
    assert len(parts) == num_clients
    assert_exact_cover(parts, len(labels))


def test_dirichlet_small_alpha_skews_labels_more_than_large_alpha():
    labels = balanced_labels(10, 500)
    uniform = np.log(10)

    def mean_entropy(alpha: float) -> float:
        parts = dirichlet(labels, 20, alpha, np.random.default_rng(1))
        return float(np.mean([label_entropy(labels, p, 10) for p in parts]))

    skewed, mild, near_iid = mean_entropy(0.1), mean_entropy(1.0), mean_entropy(100.0)
    assert skewed < mild < near_iid
    assert skewed < 0.5 * uniform  # a few labels per client
    assert near_iid > 0.95 * uniform  # close to every label equally


@pytest.mark.parametrize("min_size", [1, 30])
def test_dirichlet_respects_min_size(min_size):
    labels = balanced_labels(10, 100)
    parts = dirichlet(labels, 20, 0.5, 7, min_size=min_size)
    assert min(len(p) for p in parts) >= min_size
    assert_exact_cover(parts, len(labels))


def test_dirichlet_is_reproducible():
    labels = balanced_labels(5, 80)
    assert same_parts(dirichlet(labels, 8, 0.5, 9), dirichlet(labels, 8, 0.5, 9))
    assert not same_parts(dirichlet(labels, 8, 0.5, 9), dirichlet(labels, 8, 0.5, 10))


def test_dirichlet_works_with_non_integer_labels():
    labels = np.array(["cat", "dog", "owl"] * 20)
    parts = dirichlet(labels, 4, 1.0, 0)
    assert_exact_cover(parts, 60)


def test_dirichlet_gives_up_with_advice():
    # Two classes and alpha 0.01: nearly all of each class lands on one client, so
    # 30 clients can never all get an example.
    labels = balanced_labels(2, 50)
    with pytest.raises(PartitionError, match=r"in 5 attempts .* increase alpha, use fewer clients or lower min_size"):
        dirichlet(labels, 30, 0.01, 0, max_attempts=5)
    with pytest.raises(PartitionError, match="min_size 10 is impossible"):
        dirichlet(labels, 20, 1.0, 0, min_size=10)
    with pytest.raises(PartitionError, match="alpha must be a finite number > 0"):
        dirichlet(labels, 2, 0.0, 0)


# -- parse_partition ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        (" IID ", PartitionSpec("iid")),
        ("shards:2", PartitionSpec("shards", shards_per_client=2)),
        ("shards: 3", PartitionSpec("shards", shards_per_client=3)),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        ("Dirichlet:1e-1", PartitionSpec("dirichlet", alpha=0.1)),
    ],
)
def test_parse_partition(spec, expected):
    parsed = parse_partition(spec)
    assert parsed == expected
    assert parse_partition(str(parsed)) == parsed  # str() round-trips


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("foo", "cannot parse partition 'foo'"),
        ("", "cannot parse partition ''"),
        ("iid:2", "cannot parse partition 'iid:2'"),
        ("shards", "cannot parse partition 'shards'"),
        ("shards:0", "shards per client must be at least 1, got 0"),
        ("shards:-2", "shards per client must be at least 1, got -2"),
        ("shards:1.5", "'shards:1.5': K must be a whole number"),
        ("dirichlet:-1", r"alpha must be a finite number > 0, got -1.0"),
        ("dirichlet:0", r"alpha must be a finite number > 0, got 0.0"),
        ("dirichlet:inf", "alpha must be a finite number > 0"),
        ("dirichlet:nan", "alpha must be a finite number > 0"),
        ("dirichlet:abc", "'dirichlet:abc': ALPHA must be a number"),
    ],
)
def test_parse_partition_errors(spec, message):
    with pytest.raises(PartitionError, match=message) as info:
        parse_partition(spec)
    assert isinstance(info.value, ValueError)
    # Every refusal lists the valid forms, whatever was wrong with the spec.
    assert "expected 'iid', 'shards:K' (K >= 1 shards per client) or 'dirichlet:ALPHA'" in str(info.value)


def test_partition_spec_rejects_parameters_of_another_kind():
    with pytest.raises(PartitionError, match="'iid' takes no parameter"):
        PartitionSpec("iid", alpha=0.5)
    with pytest.raises(PartitionError, match="'shards' takes shards_per_client only"):
        PartitionSpec("shards", alpha=0.5)
    with pytest.raises(PartitionError, match="unknown partition 'random'"):
        PartitionSpec("random")


def test_partition_spec_calls_the_partitioner():
    labels = balanced_labels(10, 60)
    assert same_parts(parse_partition("iid")(labels, 6, 1), iid(600, 6, 1))
    assert same_parts(parse_partition("shards:2")(labels, 6, 1), shards(labels, 6, 2, 1))
    assert same_parts(parse_partition("dirichlet:0.5")(labels, 6, 1), dirichlet(labels, 6, 0.5, 1))
