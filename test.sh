#!/usr/bin/env bash
# The tests: installs what they need into $VENV (default .venv) on first use, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")"
DEV=1 source ./setup.sh
python -m pytest -q "$@"
