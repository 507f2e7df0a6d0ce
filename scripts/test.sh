#!/usr/bin/env bash
# The test command (README "Quick start"; CI runs it through .ci/run):
#   set up (with the dev extras and mosquitto), lint, type-check, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"

bash scripts/setup.sh --dev
echo "test: ruff check ."
"$PY" -m ruff check .
echo "test: mypy"
"$PY" -m mypy
echo "test: pytest $*"
exec "$PY" -m pytest "$@"
