#!/usr/bin/env bash
# Set up the environment with the test extras, check style and types, and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The web page test drives headless Chromium; install it from Debian's packages when missing, in the background
# while the environment is set up (both wait mostly on downloads).
chromium_install=""
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the browser test (apt-get, in the background)..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 &
  chromium_install=$!
fi
scripts/setup.sh testing
# The rest of the test extra (lm-evaluation-harness, wandb, trackio, MLflow and what they bring: about 80
# packages, half a minute) installs in the background while the first tests run, on the CPU time they leave; the
# tests that use them run last and wait for it (tests/conftest.py), and a failed install fails the suite with its
# log.
export OPENLLM_TEST_EXTRAS_STATUS="$(mktemp -d)/status"
extras_log="${OPENLLM_TEST_EXTRAS_STATUS%/status}/install.log"
(
  status=0
  nice -n 19 scripts/setup.sh --packages test >"$extras_log" 2>&1 || status=$?  # (the tests' CPU first)
  echo "$status" >"$OPENLLM_TEST_EXTRAS_STATUS"
) &
extras_install=$!
echo "ruff check, ruff format --check, mypy..."
# mypy's cache lives outside the checkout: most of it is the analysis of torch and the other dependencies, a
# half-minute of CPU that a fresh clone would otherwise redo; mypy checks every entry against its file's hash
export MYPY_CACHE_DIR="${MYPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/openllm/mypy}"
mkdir -p "$MYPY_CACHE_DIR"
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
# mypy runs beside the tests (they leave the cores idle while they wait on processes, sockets and signals); its
# verdict counts as much as theirs
mypy_log="$(mktemp)"
.venv/bin/mypy >"$mypy_log" 2>&1 &
mypy_pid=$!
if [ -n "$chromium_install" ]; then
  wait "$chromium_install" || echo "warning: could not install chromium; the browser test will fail" >&2
fi
# two workers (pytest-xdist): most tests wait on subprocesses and files, so two share two cores well (three were
# slower, measured); the slowest tests are listed, for CI's time budget
status=0
.venv/bin/python -m pytest -q -n 2 --durations=12 "$@" || status=$?
wait "$extras_install" || true
if [ "$(cat "$OPENLLM_TEST_EXTRAS_STATUS" 2>/dev/null)" != 0 ]; then
  cat "$extras_log"
  echo "installing the test extras failed" >&2
  status=1
fi
if ! wait "$mypy_pid"; then
  cat "$mypy_log"
  echo "mypy found errors" >&2
  status=1
else
  tail -n 1 "$mypy_log"
fi
rm -f "$mypy_log"
exit "$status"
