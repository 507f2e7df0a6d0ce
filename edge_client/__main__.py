"""``python -m edge_client``: the same as the ``litefed-client`` command."""

import sys

from edge_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
