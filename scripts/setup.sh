#!/usr/bin/env bash
# Create .venv (Python 3.11+) with KneeRecon and its pinned dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
req=${1:-requirements.txt}
stamp=".venv/.installed-$(basename "$req")-$(cat requirements*.txt | md5sum | cut -c1-8)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$req"
  python -m pip install -q --no-deps -e .
  touch "$stamp"
fi
