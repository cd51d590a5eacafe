#!/usr/bin/env bash
# Set up the environment with the test extras and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
