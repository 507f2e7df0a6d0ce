"""The command lines of the coordinator side: litefed-coordinator, -emulate and -simulate."""
