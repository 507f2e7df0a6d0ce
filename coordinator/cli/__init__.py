"""The command lines of the coordinator side: litefed-coordinator, -emulate and -simulate.

:mod:`~coordinator.cli.options` defines the arguments they share,
:mod:`~coordinator.cli.settings` turns parsed arguments into frozen settings
(refusing what cannot work, exit 2), and :mod:`~coordinator.cli.wiring`
builds and runs the strategy, the coordinator and local federations from them.
Logging, stop signals and exit codes are :mod:`edge_client.cli_support`'s.
"""
