"""Split a dataset among emulated clients: IID, label shards, or Dirichlet label skew.

Every partitioner returns one array of example indices per client. Each
index appears exactly once across clients, each client's indices are sorted
(shuffling for training is the trainer's job), and the split is a pure
function of the inputs and the random generator or seed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.errors import PartitionError

Seed = np.random.Generator | int
"""A generator, used as is, or an int seed for :func:`numpy.random.default_rng`."""

KINDS = ("iid", "shards", "dirichlet")
DIRICHLET_ATTEMPTS = 100


def iid(num_examples: int, num_clients: int, rng: Seed) -> list[np.ndarray]:
    """Shuffle the examples and deal them out; client sizes differ by at most one."""
    _check_clients(num_clients)
    if num_examples < num_clients:
        raise PartitionError(
            f"{num_examples} examples cannot give each of {num_clients} clients at least one; use fewer clients"
        )
    order = np.random.default_rng(rng).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, rng: Seed) -> list[np.ndarray]:
    """The pathological non-IID split of McMahan et al. (2017).

    Sort the examples by label, cut them into ``num_clients * shards_per_client``
    shards of equal size (sizes differ by one when the count does not
    divide), and give each client ``shards_per_client`` shards at random.
    A client sees at most ``shards_per_client`` labels when every class size
    is a multiple of the shard size, as for 60,000 MNIST images, 100 clients
    and 2 shards of 300; otherwise a shard can straddle two labels.
    """
    labels = _check_labels(labels)
    _check_clients(num_clients)
    _check_shards_per_client(shards_per_client)
    num_shards = num_clients * shards_per_client
    if len(labels) < num_shards:
        raise PartitionError(
            f"{len(labels)} examples cannot fill {num_shards} shards "
            f"({num_clients} clients x {shards_per_client}); use fewer clients or shards"
        )
    # A stable sort keeps the data's own order within a label, so only rng decides.
    by_label = np.argsort(labels, kind="stable")
    pieces = np.array_split(by_label, num_shards)
    dealt = np.random.default_rng(rng).permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: Seed,
    min_size: int = 1,
    max_attempts: int = DIRICHLET_ATTEMPTS,
) -> list[np.ndarray]:
    """Label skew: each class is split among clients in proportions drawn from Dir(alpha).

    Small ``alpha`` (0.1) gives each client few labels, large ``alpha``
    (100) approaches IID. Splits are drawn again, up to ``max_attempts``
    times, until every client has at least ``min_size`` examples.
    """
    labels = _check_labels(labels)
    _check_clients(num_clients)
    _check_alpha(alpha)
    if min_size < 0 or num_clients * min_size > len(labels):
        raise PartitionError(
            f"min_size {min_size} is impossible: {num_clients} clients x {min_size} > {len(labels)} examples"
        )
    rng = np.random.default_rng(rng)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_attempts):
        parts = _dirichlet_split(by_class, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise PartitionError(
        f"no Dirichlet(alpha={alpha:g}) split in {max_attempts} attempts gave all {num_clients} clients "
        f"at least {min_size} examples; increase alpha, use fewer clients or lower min_size"
    )


def _dirichlet_split(
    by_class: Sequence[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members in by_class:
        members = rng.permutation(members)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        # Cut points from the cumulative proportions; flooring keeps them in [0, len].
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            chunks[client].append(piece)
    return [np.sort(np.concatenate(c)) for c in chunks]


# -- the --partition option --------------------------------------------------------


@dataclass(frozen=True)
class PartitionSpec:
    """A partitioner chosen by name: ``iid``, ``shards:K`` or ``dirichlet:ALPHA``.

    Call it with the labels, the number of clients and a seed to get the
    per-client indices; ``str()`` gives back the spec string.
    """

    kind: str
    shards_per_client: int | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PartitionError(f"unknown partition {self.kind!r}; {_USAGE}")
        takes_shards, takes_alpha = self.kind == "shards", self.kind == "dirichlet"
        if (self.shards_per_client is not None) != takes_shards or (self.alpha is not None) != takes_alpha:
            raise PartitionError(f"{self.kind!r} takes {_PARAMETER[self.kind]}; {_USAGE}")
        # Given exactly when the kind takes it (checked above).
        if self.shards_per_client is not None:
            _check_shards_per_client(self.shards_per_client)
        if self.alpha is not None:
            _check_alpha(self.alpha)

    # The parameter is set exactly for its kind (see __post_init__).
    def __call__(self, labels: np.ndarray, num_clients: int, rng: Seed) -> list[np.ndarray]:
        if self.shards_per_client is not None:
            return shards(labels, num_clients, self.shards_per_client, rng)
        if self.alpha is not None:
            return dirichlet(labels, num_clients, self.alpha, rng)
        return iid(len(labels), num_clients, rng)

    def __str__(self) -> str:
        if self.shards_per_client is not None:
            return f"shards:{self.shards_per_client}"
        if self.alpha is not None:
            return f"dirichlet:{float(self.alpha)!r}"
        return self.kind


_PARAMETER = {"iid": "no parameter", "shards": "shards_per_client only", "dirichlet": "alpha only"}
_USAGE = "expected 'iid', 'shards:K' (K >= 1 shards per client) or 'dirichlet:ALPHA' (ALPHA > 0, e.g. 0.5)"


def parse_partition(spec: str) -> PartitionSpec:
    """Parse ``iid``, ``shards:K`` or ``dirichlet:ALPHA`` (case and spaces ignored)."""
    kind, sep, value = str(spec).strip().lower().partition(":")
    kind, value = kind.strip(), value.strip()
    if kind == "iid" and not sep:
        return PartitionSpec("iid")
    if kind == "shards" and value:
        try:
            shards_per_client = int(value)
        except ValueError as exc:
            raise PartitionError(f"{spec!r}: K must be a whole number; {_USAGE}") from exc
        return _checked_spec(spec, "shards", shards_per_client=shards_per_client)
    if kind == "dirichlet" and value:
        try:
            alpha = float(value)
        except ValueError as exc:
            raise PartitionError(f"{spec!r}: ALPHA must be a number; {_USAGE}") from exc
        return _checked_spec(spec, "dirichlet", alpha=alpha)
    raise PartitionError(f"cannot parse partition {spec!r}; {_USAGE}")


def _checked_spec(
    spec: str, kind: str, *, shards_per_client: int | None = None, alpha: float | None = None
) -> PartitionSpec:
    """``PartitionSpec(kind, ...)``; a value out of range names the spec and lists the valid forms."""
    try:
        return PartitionSpec(kind, shards_per_client, alpha)
    except PartitionError as exc:
        raise PartitionError(f"{spec!r}: {exc}; {_USAGE}") from None


# -- validation ------------------------------------------------------------------


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be one label per example (1-D), got shape {labels.shape}")
    return labels


def _check_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise PartitionError(f"num_clients must be at least 1, got {num_clients}")


def _check_shards_per_client(shards_per_client: int) -> None:
    if isinstance(shards_per_client, bool) or not isinstance(shards_per_client, (int, np.integer)):
        raise PartitionError(f"shards per client must be a whole number, got {shards_per_client!r}")
    if shards_per_client < 1:
        raise PartitionError(f"shards per client must be at least 1, got {shards_per_client}")


def _check_alpha(alpha: float | None) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise PartitionError(f"Dirichlet alpha must be a finite number > 0, got {alpha!r}")
