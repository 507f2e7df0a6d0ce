"""The coordinator commands' settings: frozen, checked, built once from the parsed arguments.

:mod:`coordinator.cli.options` defines the arguments; the ``from_args``
constructors here turn them into settings and refuse combinations that cannot
work with a :class:`~edge_client.cli_support.UsageError` (the command prints
it and exits 2) before anything is loaded. :mod:`coordinator.cli.wiring`
builds the strategy, differential privacy and evaluator from the settings.
Nothing reads or changes the ``argparse.Namespace`` after that.

Only light modules are imported at the top, so that ``--help`` stays quick;
the strategy classes come in when settings are built.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_client.broker_url import BrokerUrl
from edge_client.cli_support import UsageError
from edge_client.errors import BrokerUrlError

if TYPE_CHECKING:
    from coordinator.partition import PartitionSpec
    from coordinator.strategies import RoundConfig, Strategy
    from edge_client.weights import Weights

# litefed-emulate starts its clients itself: if they are not online by then, something is wrong.
EMULATE_WAIT_FOR_CLIENTS = 300.0


@dataclass(frozen=True)
class StrategySettings:
    """The server strategy (``--strategy``) and the parameters the options give it.

    A parameter left None keeps the class's default, the one place each is
    held. ``mu`` is also the proximal weight sent to the clients (see
    :class:`TrainingSettings`).
    """

    name: str = "fedavg"
    fraction_fit: float = 1.0
    min_fit: int = 2
    min_available: int = 2
    lr_decay: float = 1.0
    server_lr: float | None = None
    server_momentum: float | None = None
    mu: float | None = None
    trim_beta: float | None = None
    byzantine: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, clients: int | None = None) -> StrategySettings:
        """From the options; checked by :meth:`check`.

        Local runs (``clients`` given) default ``--min-available`` to the
        clients and ``--min-fit`` to ``fraction-fit x clients`` (at least 1).
        """
        min_available, min_fit = args.min_available, args.min_fit
        if clients is not None:
            min_available = min_available or clients
            min_fit = min_fit or max(1, math.ceil(args.fraction_fit * clients))
        settings = cls(
            name=args.strategy,
            fraction_fit=args.fraction_fit,
            min_fit=min_fit,
            min_available=min_available,
            lr_decay=args.lr_decay,
            server_lr=args.server_lr,
            server_momentum=args.server_momentum,
            mu=args.mu,
            trim_beta=args.trim_beta,
            byzantine=args.byzantine,
        )
        settings.check()
        return settings

    def options(self) -> dict[str, Any]:
        """The keyword arguments of the strategy's class that these settings set."""
        options: dict[str, Any] = {
            "fraction_fit": self.fraction_fit,
            "min_fit": self.min_fit,
            "min_available": self.min_available,
            "lr_decay": self.lr_decay,
            "server_lr": self.server_lr,
        }
        own: dict[str, dict[str, Any]] = {
            "fedavgm": {"server_momentum": self.server_momentum},
            "fedprox": {"mu": self.mu},
            "trimmed-mean": {"beta": self.trim_beta},
            "krum": {"num_byzantine": self.byzantine},
        }
        options |= own.get(self.name, {})
        return {name: value for name, value in options.items() if value is not None}

    def build(
        self, round_config: RoundConfig | None = None, evaluate_fn: Callable[[Weights], dict] | None = None
    ) -> Strategy:
        """The strategy; :class:`~coordinator.errors.CoordinatorError` if its class refuses the parameters."""
        from coordinator.errors import CoordinatorError
        from coordinator.strategies import STRATEGIES

        cls = STRATEGIES.get(self.name)
        if cls is None:
            raise CoordinatorError(f"unknown strategy {self.name!r}; choose one of {', '.join(STRATEGIES)}")
        return cls(round_config=round_config, evaluate_fn=evaluate_fn, **self.options())

    def check(self) -> None:
        """Raise :class:`UsageError` unless the strategy can be built.

        It is built once, without data, so that its own checks (Krum's and the
        trimmed mean's client counts, hyper-parameter ranges) are one-line
        usage errors too.
        """
        from coordinator.errors import CoordinatorError

        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        try:
            self.build()
        except CoordinatorError as exc:
            raise UsageError(str(exc)) from None


@dataclass(frozen=True)
class TrainingSettings:
    """What every round asks of the clients: local epochs, learning rate and update codec.

    ``lr`` None is the manifest's learning rate. The proximal weight is
    :attr:`StrategySettings.mu`.
    """

    epochs: int = 1
    lr: float | None = None
    codec: str = "float32"


@dataclass(frozen=True)
class PrivacySettings:
    """Central client-level differential privacy: clip each update to ``clip``, noise the mean.

    The noise's standard deviation is ``noise x clip / clients``; ``delta``
    is the one the reported epsilon refers to. ``seed`` makes the noise
    reproducible: simulations only, never a deployment (None: OS entropy).
    """

    clip: float
    noise: float = 0.0
    delta: float = 1e-5
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, seed: int | None = None) -> PrivacySettings | None:
        """From ``--dp-*``; None without ``--dp-clip`` (no DP)."""
        if args.dp_noise and args.dp_clip is None:
            raise UsageError("--dp-noise needs --dp-clip: the noise is calibrated to the clipping norm")
        if args.dp_clip is not None and not args.dp_clip > 0:
            raise UsageError(f"--dp-clip must be positive, got {args.dp_clip}")
        if args.dp_noise < 0 or not 0 < args.dp_delta < 1:
            raise UsageError("--dp-noise must be >= 0 and --dp-delta in (0, 1)")
        if args.dp_clip is None:
            return None
        return cls(clip=args.dp_clip, noise=args.dp_noise, delta=args.dp_delta, seed=seed)

    def wrap(self, strategy: Strategy) -> Strategy:
        """``strategy`` behind this DP: each update clipped, noise added to the mean."""
        from coordinator.strategies.dp import DifferentialPrivacy

        return DifferentialPrivacy(
            strategy=strategy, clip_norm=self.clip, noise_multiplier=self.noise, delta=self.delta, seed=self.seed
        )


@dataclass(frozen=True)
class EvaluationSettings:
    """The held-out set the global model is evaluated on after every round (None: no evaluation).

    ``threads`` is the evaluator's LiteRT thread count (None: LiteRT's choice).
    """

    test_data: str | None = None
    threads: int | None = None


@dataclass(frozen=True)
class RunSettings:
    """What every coordinator command runs: model, rounds, strategy, client training, DP, evaluation.

    ``model`` None (local runs only) is the built-in MNIST CNN, which
    :func:`~coordinator.cli.wiring.prepare_local_federation` fills in.
    """

    model: Path | None
    out: Path
    strategy: StrategySettings
    training: TrainingSettings = TrainingSettings()
    privacy: PrivacySettings | None = None
    evaluation: EvaluationSettings = EvaluationSettings()
    rounds: int = 10
    seed: int = 0
    progress: bool = True

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        *,
        clients: int | None = None,
        dp_seed: int | None = None,
        eval_threads: int | None = None,
    ) -> RunSettings:
        """From the options of :func:`~coordinator.cli.options.add_round_arguments` and ``--model``/``--out``."""
        privacy = PrivacySettings.from_args(args, seed=dp_seed)
        return cls(
            model=args.model,
            out=args.out,
            strategy=StrategySettings.from_args(args, clients),
            training=TrainingSettings(epochs=args.epochs, lr=args.lr, codec=args.codec),
            privacy=privacy,
            evaluation=EvaluationSettings(test_data=args.test_data, threads=eval_threads),
            rounds=args.rounds,
            seed=args.seed,
            progress=not args.no_progress,
        )


@dataclass(frozen=True)
class BoundSettings:
    """What the coordinator takes from clients at most (``--max-clients`` ... ``--max-update-norm``).

    ``allowed_clients`` are the ids of ``--clients-file`` (None: any id).
    """

    max_clients: int = 10_000
    presence_rate: int = 12
    allowed_clients: frozenset[str] | None = None
    max_examples: int = 10_000_000
    max_update_norm: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BoundSettings:
        """From the options; a bound that cannot work or an unreadable ``--clients-file`` is a usage error."""
        if args.max_clients < 1 or args.presence_rate < 1 or args.max_examples < 1:
            raise UsageError("--max-clients, --presence-rate and --max-examples must be >= 1")
        norm = args.max_update_norm
        if norm is not None and not (math.isfinite(norm) and norm > 0):
            raise UsageError(f"--max-update-norm must be a positive number, got {norm}")
        allowed = None if args.clients_file is None else read_clients_file(args.clients_file)
        return cls(args.max_clients, args.presence_rate, allowed, args.max_examples, norm)


def read_clients_file(path: Path) -> frozenset[str]:
    """The client ids in ``path``: one per line, blank lines and ``#`` comments ignored; else a usage error."""
    from edge_client.topics import check_name

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--clients-file {path}: cannot read it ({exc}); give a text file of client ids") from None
    ids = [line.split("#", 1)[0].strip() for line in lines]
    try:
        allowed = frozenset(check_name("client id", i) for i in ids if i)
    except ValueError as exc:
        raise UsageError(f"--clients-file {path}: {exc}") from None
    if not allowed:
        raise UsageError(f"--clients-file {path} lists no client id; one id per line")
    return allowed


@dataclass(frozen=True)
class ServiceSettings:
    """How rounds run over MQTT: the topic tree, the round deadline, retries, the wait for clients, the bounds.

    ``broker_outage_timeout`` is how long the broker may stay unreachable before the coordinator gives up.
    ``signing_key``: the PEM file of the Ed25519 key that signs what boards download (None: unsigned).
    """

    federation: str = "default"
    topic_prefix: str = "litefed"
    round_timeout: float = 120.0
    max_attempts: int = 3
    wait_for_clients: float | None = None
    bounds: BoundSettings = BoundSettings()
    broker_outage_timeout: float = 600.0
    signing_key: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, wait_for_clients: float | None = None) -> ServiceSettings:
        """From the MQTT options; ``wait_for_clients`` replaces an unset ``--wait-for-clients``."""
        return cls(
            federation=args.federation,
            topic_prefix=args.topic_prefix,
            round_timeout=args.round_timeout,
            max_attempts=args.max_attempts,
            wait_for_clients=args.wait_for_clients or wait_for_clients,
            bounds=BoundSettings.from_args(args),
            broker_outage_timeout=_positive(args.broker_outage_timeout, "--broker-outage-timeout"),
            signing_key=getattr(args, "signing_key", None),  # litefed-coordinator's; the emulation makes its own
        )


def _positive(value: float, option: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{option} must be a positive number of seconds, got {value}")
    return value


@dataclass(frozen=True)
class BrokerSettings:
    """The coordinator's connection: the broker (URL and TLS files) and its MQTT client id."""

    url: BrokerUrl
    client_id: str

    @classmethod
    def for_federation(cls, url: BrokerUrl, federation: str) -> BrokerSettings:
        return cls(url, f"coordinator-{federation}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BrokerSettings:
        """From ``--broker`` and the TLS files; a bad URL or a missing file is a usage error."""
        try:
            url = BrokerUrl.parse(args.broker, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
        except BrokerUrlError as exc:
            raise UsageError(str(exc)) from None
        return cls.for_federation(url, args.federation)


@dataclass(frozen=True)
class LocalSettings:
    """A federation on this machine: how many clients, and the data they split and how."""

    clients: int
    partition: PartitionSpec
    data: str = "mnist-small"
    batch_size: int = 32  # of the built-in model

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LocalSettings:
        if args.clients < 1:
            raise UsageError(f"--clients must be >= 1, got {args.clients}")
        return cls(clients=args.clients, partition=args.partition, data=args.data, batch_size=args.batch_size)


# -- one per command ---------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinatorSettings:
    """``litefed-coordinator``: rounds over MQTT with the devices that come online."""

    run: RunSettings
    service: ServiceSettings
    broker: BrokerSettings

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CoordinatorSettings:
        # DP noise from OS entropy: never seeded in a deployment.
        run = RunSettings.from_args(args)
        return cls(run=run, service=ServiceSettings.from_args(args), broker=BrokerSettings.from_args(args))


@dataclass(frozen=True)
class EmulateSettings:
    """``litefed-emulate``: client processes and a coordinator on this machine.

    ``broker_url`` is a running broker's; when None, an embedded broker of
    ``broker_kind`` (auto, mosquitto or amqtt) is started, serving the
    emulated fleet's provisioned identities (TLS, client certificates, the
    ACL) unless ``insecure`` (anonymous, plain TCP).
    """

    run: RunSettings
    service: ServiceSettings
    local: LocalSettings
    broker_kind: str = "auto"
    broker_url: BrokerUrl | None = None
    insecure: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EmulateSettings:
        from coordinator.broker import KINDS

        local = LocalSettings.from_args(args)
        run = RunSettings.from_args(args, clients=local.clients)
        service = ServiceSettings.from_args(args, wait_for_clients=EMULATE_WAIT_FOR_CLIENTS)
        if "://" not in args.broker:
            if args.broker not in KINDS:
                raise UsageError(f"--broker {args.broker!r}: use {', '.join(KINDS)}, or a URL like mqtt://host:1883")
            return cls(run=run, service=service, local=local, broker_kind=args.broker, insecure=args.insecure)
        if args.insecure:
            raise UsageError("--insecure applies to the embedded broker; with --broker URL the clients use that URL")
        try:
            url = BrokerUrl.parse(args.broker)
        except BrokerUrlError as exc:
            raise UsageError(str(exc)) from None
        return cls(run=run, service=service, local=local, broker_url=url)

    def coordinator(self, run: RunSettings, url: BrokerUrl) -> CoordinatorSettings:
        """The coordinator's settings once the broker runs at ``url`` (``run``: the resolved model and test set)."""
        return CoordinatorSettings(run, self.service, BrokerSettings.for_federation(url, self.service.federation))


@dataclass(frozen=True)
class SimulateSettings:
    """``litefed-simulate``: virtual clients in worker processes, no broker."""

    run: RunSettings
    local: LocalSettings
    workers: int = 0
    target_accuracy: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SimulateSettings:
        local = LocalSettings.from_args(args)
        if args.workers < 0:
            raise UsageError(f"--workers must be >= 0 (0 trains in this process), got {args.workers}")
        # Seeded DP noise: research only. The workers are idle while the server evaluates.
        run = RunSettings.from_args(args, clients=local.clients, dp_seed=args.seed, eval_threads=max(1, args.workers))
        return cls(run=run, local=local, workers=args.workers, target_accuracy=args.target_accuracy)
