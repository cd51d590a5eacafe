#!/usr/bin/env bash
# Create .venv (if needed) and install OpenLLM into it, pinned by constraints.txt.
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv >/dev/null 2>&1 || python3 -m venv .venv
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.installed-${extras:-core}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  # Byte-compiled once here, on every core (pip compiles one file at a time): where PYTHONDONTWRITEBYTECODE is
  # set, as on CI machines, Python would otherwise recompile torch's modules in every process, 3 s each time
  .venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check -c constraints.txt -e "$spec" 2>&1 \
    | grep -v "^WARNING: Location" || true
  # (but not the ~2,600 files of transformers' models that OpenLLM never imports, nor pip's own)
  .venv/bin/python -m compileall -q -j 0 -x '/transformers/models/(?!(auto|encoder_decoder|gpt2|llama|qwen2|qwen3)/|__init__\.py)|/pip/' \
    "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
  .venv/bin/python -c "import openllm, torch" || { echo "setup failed: openllm did not install" >&2; exit 1; }
  touch "$stamp"
fi
# OpenLLM's own modules too (each command a test runs imports them afresh; only changed files are recompiled)
.venv/bin/python -m compileall -q -j 0 src >/dev/null 2>&1 || true
