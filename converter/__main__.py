"""``python -m converter``: same as ``litefed-convert``."""

import sys

from converter.cli import main

sys.exit(main())
