#!/usr/bin/env bash
# Creates (once) the virtual environment $VENV (default .venv) and installs requirements.txt, plus
# requirements-dev.txt when DEV=1. Sourced by run.sh and test.sh; safe to run again.
set -euo pipefail
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.installed${DEV:+-dev}"
req=requirements.txt; [ "${DEV:-0}" = 1 ] && req=requirements-dev.txt
if [ ! -f "$stamp" ] || [ "$req" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
# tiktoken downloads GPT-2's encoding on first use; use the offline copy beside the repo when there is one
if [ -z "${TIKTOKEN_CACHE_DIR:-}" ] && [ -d ../shared/data/tiktoken_cache ]; then
  export TIKTOKEN_CACHE_DIR=$(cd ../shared/data/tiktoken_cache && pwd)
fi
export PATH="$VENV/bin:$PATH"
