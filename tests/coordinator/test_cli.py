"""litefed-coordinator, litefed-emulate and the plots: help, errors, output."""

from __future__ import annotations

import inspect
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest

from coordinator.cli import coordinate, emulate, simulate
from coordinator.cli.settings import CoordinatorSettings, EmulateSettings, SimulateSettings, StrategySettings
from coordinator.plots import plot_rounds
from edge_client.cli_support import UsageError
from tests.helpers import modules_loaded_by

# What --help and option parsing must not import.
HEAVY = ("tensorflow", "keras", "ai_edge_litert", "matplotlib", "tqdm", "paho", "coordinator.service")


def coordinator_settings(*argv: str, model: str = "m.tflite") -> CoordinatorSettings:
    """The settings ``litefed-coordinator --model MODEL ARGV...`` runs with."""
    return CoordinatorSettings.from_args(coordinate.build_parser().parse_args(["--model", model, *argv]))


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("litefed-coordinator", ["--model", "--broker", "--min-fit", "--round-timeout", "--test-data", "examples:"]),
        ("litefed-emulate", ["--clients", "--partition", "dirichlet:ALPHA", "--broker", "--data", "--batch-size"]),
        ("litefed-broker", ["--kind", "--port"]),
        ("litefed-simulate", ["--clients", "--workers", "--partition", "--dp-clip", "--target-accuracy", "examples:"]),
        ("litefed-plot", ["--label", "--out"]),
        ("litefed-client", ["--config", "--broker", "--client-id", "--data"]),
    ],
)
def test_help_is_installed_and_explains_the_options(command, expected):
    exe = shutil.which(command)
    assert exe, f"{command} is not installed; run scripts/setup.sh"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for word in expected:
        assert word in out, f"{command} --help does not mention {word}"


def test_coordinator_reports_a_missing_model_and_exits_1(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)
    assert coordinate.main(["--model", str(tmp_path / "none.tflite"), "--out", str(tmp_path)]) == 1
    assert signal.getsignal(signal.SIGINT) is before, "main() must give the caller its signal handler back"
    err = capsys.readouterr().err
    assert err.startswith("litefed-coordinator: error:") and "none.json" in err


@pytest.mark.parametrize("build", [emulate.build_parser, simulate.build_parser])
@pytest.mark.parametrize("spec", ["dirichlet:-1", "dirichlet", "random", "shards:x"])
def test_a_bad_partition_spec_is_one_line_listing_the_valid_forms(build, spec, capsys):
    with pytest.raises(SystemExit) as info:
        build().parse_args(["--partition", spec])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and last.startswith(f"{build().prog}: error: argument --partition: ")
    for form in ("'iid'", "'shards:K'", "'dirichlet:ALPHA'"):
        assert form in last


PARSERS = {"litefed-coordinator": coordinate.build_parser, "litefed-emulate": emulate.build_parser,
           "litefed-simulate": simulate.build_parser}  # fmt: skip


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_states_the_default_of_every_option(command):
    parser = PARSERS[command]()
    for action in parser._actions:
        if not action.option_strings or action.required or action.nargs == 0:  # positionals, --model, flags
            continue
        assert "default" in (action.help or ""), f"{command} {action.option_strings[0]}: help states no default"
    text = parser.format_help()
    for option in ("--min-available", "--min-fit", "--out", "--partition", "--codec", "--server-lr"):
        if option in text:
            assert "default" in parser._option_string_actions[option].help, option


def test_help_shows_the_strategy_classes_defaults():
    from coordinator.strategies import STRATEGIES

    parser = coordinate.build_parser()
    args = parser.parse_args(["--model", "m.tflite"])
    signature = {name: inspect.signature(cls).parameters for name, cls in STRATEGIES.items()}
    assert args.server_momentum == signature["fedavgm"]["server_momentum"].default
    assert args.trim_beta == signature["trimmed-mean"]["beta"].default
    assert args.byzantine == signature["krum"]["num_byzantine"].default
    server_lr_help = " ".join(parser._option_string_actions["--server-lr"].help.split())
    for name, cls in STRATEGIES.items():
        group = next(part for part in server_lr_help.split(";") if re.search(rf"\b{re.escape(name)}\b", part))
        assert f"{cls.DEFAULT_SERVER_LR:g} for" in group, (name, server_lr_help)
    assert f"{signature['fedprox']['mu'].default} with --strategy fedprox" in parser._option_string_actions["--mu"].help


def test_help_imports_nothing_heavy():
    code = (
        "from coordinator.cli import coordinate, emulate, simulate\n"
        "for build in (coordinate.build_parser, emulate.build_parser, simulate.build_parser):\n"
        "    build().format_help()\n"
    )
    assert modules_loaded_by(code, HEAVY) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "trimmed-mean"], "min_fit=2 .*non-robust mean.*--min-fit >= 5"),
        (["--strategy", "trimmed-mean", "--min-fit", "4", "--min-available", "4"], "--trim-beta >= 0.25"),
        (["--strategy", "krum"], "2f \\+ 3 = 5"),
        (["--strategy", "trimmed-mean", "--trim-beta", "0.6"], "beta must be a number in \\[0, 0.5\\)"),
    ],
)
def test_strategy_that_cannot_work_is_a_usage_error(argv, message, capsys):
    assert coordinate.main(["--model", "missing.tflite", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]), err


def test_local_runs_check_the_trimmed_mean_against_the_clients():
    parser = simulate.build_parser()
    few = parser.parse_args(["--clients", "4", "--strategy", "trimmed-mean"])
    with pytest.raises(UsageError):
        SimulateSettings.from_args(few)
    enough = parser.parse_args(["--clients", "5", "--strategy", "trimmed-mean"])
    strategy = SimulateSettings.from_args(enough).run.strategy  # 5 updates a round trim one from each end
    assert (strategy.min_fit, strategy.min_available) == (5, 5)
    assert (enough.min_fit, enough.min_available) == (None, None), "the settings must not change the arguments"


@pytest.mark.parametrize("codec", ["float32", "int8", "int8-channel", "topk:0.01", "topk16:0.1"])
def test_codec_option_takes_every_registered_codec(codec):
    assert coordinate.build_parser().parse_args(["--model", "m.tflite", "--codec", codec]).codec == codec


@pytest.mark.parametrize("codec", ["pickle", "topk:0", "topk:2"])
def test_codec_option_refuses_unknown_codecs(codec, capsys):
    with pytest.raises(SystemExit):
        coordinate.build_parser().parse_args(["--model", "m.tflite", "--codec", codec])
    assert "unknown_codec" in capsys.readouterr().err


def test_plot_draws_every_run(tmp_path):
    records = [{"round": r, "test_accuracy": 0.5 + r / 20, "test_loss": 1 / r, "train_loss": 1.2 / r} for r in (1, 2)]
    only_train = [{"round": 1, "test_accuracy": None, "test_loss": None, "train_loss": 0.9}]
    out = plot_rounds({"a": records, "b": records, "c": only_train}, tmp_path / "p.png", "title", target=0.6)
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000


def test_accuracy_range_zooms_the_accuracy_axis(tmp_path, monkeypatch):
    from coordinator import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figures.append(fig) or out)
    records = [{"round": r, "test_accuracy": 0.2 * r, "test_loss": 1 / r, "bytes_in": 10} for r in (1, 2, 3, 4)]
    plots.plot_rounds({"a": records}, tmp_path / "p.png", accuracy_range=(0.5, 1.0))
    plots.plot_accuracy_vs_bytes({"a": records}, tmp_path / "b.png", accuracy_range=(0.5, 1.0))
    plots.plot_rounds({"a": records}, tmp_path / "q.png")
    assert figures[0].axes[0].get_ylim() == (0.5, 1.0) and figures[1].axes[0].get_ylim() == (0.5, 1.0)
    assert figures[2].axes[0].get_ylim()[0] < 0.2  # without a range the axis fits the data


def test_accuracy_against_uploaded_bytes(tmp_path):
    from coordinator.plots import plot_accuracy_vs_bytes

    runs = {
        codec: [{"round": r, "test_accuracy": 0.5 + r / 20, "bytes_in": size} for r in (1, 2, 3)]
        for codec, size in (("float32", 6_000_000), ("int8", 1_500_000))
    }
    out = plot_accuracy_vs_bytes(runs, tmp_path / "bytes.png", "cost", target=0.6)
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("argv", "kind", "attributes"),
    [
        ([], "FedAvg", {"server_lr": 1.0}),
        (["--strategy", "fedavgm", "--server-momentum", "0.5"], "FedAvgM", {"server_momentum": 0.5}),
        (["--strategy", "fedadam"], "FedAdam", {"server_lr": 0.03, "tau": 1e-3}),
        (["--strategy", "fedyogi", "--server-lr", "0.01"], "FedYogi", {"server_lr": 0.01}),
        (["--strategy", "fedadagrad"], "FedAdagrad", {"server_lr": 0.1}),
        (["--strategy", "fedprox"], "FedProx", {"mu": 0.01, "server_lr": 1.0}),
        (["--strategy", "median"], "FedMedian", {}),
        (
            ["--strategy", "trimmed-mean", "--trim-beta", "0.25", "--min-fit", "4", "--min-available", "4"],
            "FedTrimmedAvg",
            {"beta": 0.25},
        ),
        (["--strategy", "krum", "--byzantine", "1", "--min-fit", "5", "--min-available", "5"], "Krum", {}),
    ],
)
def test_strategy_options_build_the_named_strategy(argv, kind, attributes):
    from coordinator.cli.wiring import make_strategy
    from coordinator.strategies import RoundConfig

    settings = coordinator_settings(*argv).run.strategy
    strategy = make_strategy(settings, RoundConfig(mu=settings.mu or 0.0), None)
    assert type(strategy).__name__ == kind
    for name, value in attributes.items():
        assert getattr(strategy, name) == pytest.approx(value)


def test_fedprox_sends_its_mu_to_clients():
    from coordinator.cli.wiring import make_strategy
    from coordinator.strategies import RoundConfig

    settings = coordinator_settings("--strategy", "fedprox", "--mu", "0.3").run.strategy
    strategy = make_strategy(settings, RoundConfig(mu=0.3), None)
    _, config = strategy.configure_round(1, ["a", "b"], np.random.default_rng(0))
    assert config.mu == pytest.approx(0.3)


def test_lr_decay_reaches_the_round_config_of_any_strategy():
    from coordinator.cli.wiring import make_strategy
    from coordinator.strategies import RoundConfig

    for name in ("fedavg", "fedavgm", "fedyogi", "median"):
        settings = coordinator_settings("--strategy", name, "--lr-decay", "0.5").run.strategy
        strategy = make_strategy(settings, RoundConfig(lr=0.1), None)
        _, config = strategy.configure_round(3, ["a", "b"], np.random.default_rng(0))
        assert config.lr == pytest.approx(0.025), name


def test_krum_refuses_too_few_clients_with_a_clear_error():
    from coordinator.cli.wiring import make_strategy
    from coordinator.errors import CoordinatorError
    from coordinator.strategies import RoundConfig

    with pytest.raises(CoordinatorError, match="2f \\+ 3"):
        make_strategy(StrategySettings(name="krum"), RoundConfig(), None)  # min-fit 2 < 2f+3
    with pytest.raises(UsageError, match="2f \\+ 3"):  # the same from the options, before anything runs
        coordinator_settings("--strategy", "krum")


def test_dp_options_wrap_the_named_strategy(tabular):
    from coordinator.cli.wiring import build_strategy
    from coordinator.strategies import FedAvgM
    from coordinator.strategies.dp import DifferentialPrivacy

    argv = ["--strategy", "fedavgm", "--dp-clip", "0.5", "--dp-noise", "1.2", "--dp-delta", "1e-6"]
    strategy = build_strategy(coordinator_settings(*argv, model=str(tabular.model_path)).run)
    assert isinstance(strategy, DifferentialPrivacy) and isinstance(strategy.strategy, FedAvgM)
    assert (strategy.clip_norm, strategy.noise_multiplier, strategy.delta) == (0.5, 1.2, 1e-6)
    plain = build_strategy(coordinator_settings(model=str(tabular.model_path)).run)
    assert not isinstance(plain, DifferentialPrivacy)


def test_no_held_out_set_is_said_not_silent(tabular, caplog):
    from coordinator.cli.wiring import build_strategy

    with caplog.at_level("WARNING", logger="coordinator.cli.wiring"):
        strategy = build_strategy(coordinator_settings(model=str(tabular.model_path)).run)
    assert strategy.evaluate(1, []) is None
    assert "no held-out set" in caplog.text and "--test-data" in caplog.text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dp-noise", "1.0"], "--dp-noise needs --dp-clip"),
        (["--dp-clip", "0"], "--dp-clip must be positive"),
        (["--dp-clip", "1", "--dp-delta", "2"], "--dp-delta in (0, 1)"),
        (["--lr-decay", "0"], "--lr-decay must be in (0, 1]"),
        (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1]"),
    ],
)
def test_inconsistent_round_options_are_refused_before_anything_runs(argv, message, capsys):
    assert coordinate.main(["--model", "missing.tflite", *argv]) == 2
    assert message in capsys.readouterr().err


def test_emulate_reports_missing_data_in_one_line(tmp_path, tabular, capsys):
    code = emulate.main(["--model", str(tabular.model_path), "--data", str(tmp_path / "nope.npz"), "--out",
                         str(tmp_path / "run")])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "litefed-emulate: error: training data" in err and "nope.npz" in err and "Traceback" not in err


# -- the settings the commands run with ------------------------------------------------


@pytest.mark.parametrize("main", [coordinate.main, emulate.main, simulate.main])
def test_main_returns_the_status_instead_of_exiting(main, capsys):
    assert main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out
    assert main(["--model", "m.tflite", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_settings_are_built_without_anything_heavy():
    code = (
        "from coordinator.cli import coordinate, emulate, simulate\n"
        "from coordinator.cli.settings import CoordinatorSettings, EmulateSettings, SimulateSettings\n"
        "CoordinatorSettings.from_args(coordinate.build_parser().parse_args(['--model', 'm.tflite']))\n"
        "EmulateSettings.from_args(emulate.build_parser().parse_args([]))\n"
        "SimulateSettings.from_args(simulate.build_parser().parse_args([]))\n"
    )
    assert modules_loaded_by(code, HEAVY) == []


def test_settings_are_frozen_and_leave_the_arguments_alone():
    import dataclasses

    args = emulate.build_parser().parse_args(["--clients", "3", "--fraction-fit", "0.5"])
    settings = EmulateSettings.from_args(args)
    assert (settings.run.strategy.min_available, settings.run.strategy.min_fit) == (3, 2)  # ceil(0.5 x 3)
    assert (args.min_available, args.min_fit, args.wait_for_clients) == (None, None, None)
    assert settings.service.wait_for_clients == 300.0  # emulated clients start with the run
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.run.strategy.min_fit = 1  # type: ignore[misc]


def test_dp_noise_is_seeded_in_simulations_only():
    argv = ["--dp-clip", "1", "--dp-noise", "0.5", "--seed", "7"]
    simulated = SimulateSettings.from_args(simulate.build_parser().parse_args([*argv, "--workers", "3"]))
    assert (simulated.run.privacy.seed, simulated.run.evaluation.threads) == (7, 3)
    assert (
        SimulateSettings.from_args(simulate.build_parser().parse_args(["--workers", "0"])).run.evaluation.threads == 1
    )
    deployed = coordinator_settings(*argv).run.privacy
    assert (deployed.clip, deployed.noise, deployed.seed) == (1.0, 0.5, None)  # OS entropy in a deployment
    assert coordinator_settings().run.privacy is None


def test_broker_settings_hold_the_url_and_its_tls_files(tmp_path):
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "c.crt", "c.key"))
    for path in (ca, cert, key):
        path.write_text("x")
    tls = ["--ca-file", str(ca), "--cert-file", str(cert), "--key-file", str(key)]
    broker = coordinator_settings("--broker", "mqtts://co:s3cret@b.example", "--federation", "farm", *tls).broker
    assert (broker.url.host, broker.url.port, broker.url.tls, broker.url.password) == (
        "b.example",
        8883,
        True,
        "s3cret",
    )
    assert (broker.url.ca_file, broker.url.cert_file, broker.url.key_file) == (ca, cert, key)
    assert broker.client_id == "coordinator-farm" and "s3cret" not in str(broker)

    transport = coordinate.make_transport(coordinator_settings().broker)  # no network until connect()
    assert (str(transport.url), transport.client_id) == ("mqtt://127.0.0.1:1883", "coordinator-default")
    transport.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--broker", "http://co:s3cret@b"], "scheme 'http'"),
        (["--broker", "mqtt://b", "--ca-file", "ca.pem"], "need an mqtts:// broker URL"),
        (["--broker", "mqtts://b", "--cert-file", "c.crt"], "both cert_file and key_file"),
        (["--broker", "mqtts://b", "--ca-file", "missing.pem"], "missing.pem not found"),
    ],
)
def test_a_bad_broker_is_a_usage_error_before_anything_loads(argv, message, capsys):
    assert coordinate.main(["--model", "missing.tflite", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("litefed-coordinator: error: ") and message in err[-1], err
    assert "s3cret" not in "\n".join(err)


def test_emulate_takes_a_broker_kind_or_url(capsys):
    parser = emulate.build_parser()
    assert EmulateSettings.from_args(parser.parse_args(["--broker", "amqtt"])).broker_kind == "amqtt"
    running = EmulateSettings.from_args(parser.parse_args(["--broker", "mqtt://pi:p%40ss@10.0.0.2"])).broker_url
    assert running.geturl(redact=False) == "mqtt://pi:p%40ss@10.0.0.2:1883"  # what the clients' files get
    assert emulate.main(["--broker", "hivemq"]) == 2
    assert "--broker 'hivemq': use auto, mosquitto, amqtt, or a URL" in capsys.readouterr().err
    assert emulate.main(["--broker", "mqtt://h/x"]) == 2
    assert "path" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        (simulate.main, ["--workers", "-1"], "--workers must be >= 0"),
        (simulate.main, ["--clients", "0"], "--clients must be >= 1, got 0"),
        (emulate.main, ["--clients", "0"], "--clients must be >= 1, got 0"),
    ],
)
def test_local_run_sizes_are_usage_errors(main, argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# -- bounds on what clients send (issue 11) ------------------------------------------------


def test_bound_options_reach_the_coordinator(tabular, tmp_path):
    from coordinator.cli.wiring import build_coordinator
    from edge_client.transport import InMemoryBroker, InMemoryTransport

    clients = tmp_path / "clients.txt"
    clients.write_text("# provisioned boards\npi-1\n\npi-2  # the greenhouse\n")
    argv = ["--max-clients", "50", "--presence-rate", "4", "--clients-file", str(clients), "--max-examples", "900",
            "--max-update-norm", "2.5", "--broker-outage-timeout", "42", "--out", str(tmp_path / "run")]  # fmt: skip
    settings = coordinator_settings(*argv, model=str(tabular.model_path))
    coordinator = build_coordinator(settings, lambda broker: InMemoryTransport(InMemoryBroker(), broker.client_id))
    config = coordinator.config
    assert (config.max_clients, config.presence_rate, config.max_examples, config.max_update_norm) == (50, 4, 900, 2.5)
    assert config.allowed_clients == frozenset({"pi-1", "pi-2"}) and config.broker_outage_timeout == 42
    assert (coordinator.engine.max_examples, coordinator.engine.max_update_norm) == (900, 2.5)
    assert coordinator.presences.allowed == config.allowed_clients and coordinator.presences.max_clients == 50


def test_bound_defaults_are_the_coordinators():
    from coordinator.service import CoordinatorConfig

    bounds = coordinator_settings().service.bounds
    config = CoordinatorConfig(model_path="m.tflite")  # type: ignore[arg-type]
    assert (bounds.max_clients, bounds.presence_rate, bounds.allowed_clients, bounds.max_examples) == (
        config.max_clients,
        config.presence_rate,
        config.allowed_clients,
        config.max_examples,
    )
    assert bounds.max_update_norm is config.max_update_norm is None


@pytest.mark.parametrize(
    ("argv", "content", "message"),
    [
        (["--max-clients", "0"], None, "--max-clients, --presence-rate and --max-examples must be >= 1"),
        (["--presence-rate", "-1"], None, "must be >= 1"),
        (["--max-update-norm", "0"], None, "--max-update-norm must be a positive number"),
        (["--max-update-norm", "nan"], None, "--max-update-norm must be a positive number"),
        (["--clients-file", "{missing}"], None, "cannot read it"),
        (["--clients-file", "{file}"], "pi-1\npi/2\n", "'pi/2' must be 1-64 characters"),
        (["--clients-file", "{file}"], "# nobody\n", "lists no client id"),
    ],
)
def test_bounds_that_cannot_work_are_usage_errors(argv, content, message, tmp_path, capsys):
    path = tmp_path / "clients.txt"
    if content is not None:
        path.write_text(content)
    argv = [a.format(missing=tmp_path / "none.txt", file=path) for a in argv]
    assert coordinate.main(["--model", "missing.tflite", *argv]) == 2
    assert message in capsys.readouterr().err
