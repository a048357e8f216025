#!/usr/bin/env bash
# Set up (with slicer-core for the MRML tests), then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q "$@"
