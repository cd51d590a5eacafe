#!/usr/bin/env bash
# Create .venv (if needed) and install OpenLLM into it, pinned by constraints.txt.
# Usage: scripts/setup.sh [extras]        e.g. scripts/setup.sh test
#        scripts/setup.sh --packages EXTRA  only the packages EXTRA adds (not OpenLLM itself, nor the extras it
#                                           names): what scripts/test.sh installs while the first tests run
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv >/dev/null 2>&1 || python3 -m venv .venv
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

pip_install() {
  # Byte-compiled afterwards, on every core (pip compiles one file at a time): where PYTHONDONTWRITEBYTECODE is
  # set, as on CI machines, Python would otherwise recompile torch's modules in every process, 3 s each time
  local log status=0
  log="$(mktemp)"
  .venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check -c constraints.txt "$@" >"$log" 2>&1 \
    || status=$?
  grep -v "^WARNING: Location" "$log" || true
  rm -f "$log"
  # (but not what OpenLLM and its tests never import: the ~2,600 files of transformers' models, pip, the packages'
  # own tests, lm-evaluation-harness's task folders, and scipy, scikit-learn and nltk, which only some harness
  # metrics load: about 8,000 of 22,000 files; files compiled before are skipped)
  .venv/bin/python -m compileall -q -j 0 \
    -x '/transformers/models/(?!(auto|encoder_decoder|gpt2|llama|qwen2|qwen3)/|__init__\.py)|/pip/|/tests?/|/lm_eval/tasks/[^/]+/|/(scipy|sklearn|nltk)/' \
    "$site" >/dev/null 2>&1 || true
  return "$status"
}

if [ "${1:-}" = "--packages" ]; then
  extra="${2:?--packages needs an extra}"
  # the extra's requirements as pyproject.toml lists them, less the extras of OpenLLM it names
  mapfile -t packages < <(.venv/bin/python - "$extra" <<'EOF'
import sys
try:
    import tomllib
except ImportError:  # (Python 3.10: pip's own copy)
    from pip._vendor import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for requirement in project["optional-dependencies"][sys.argv[1]]:
    if not requirement.startswith(project["name"] + "["):
        print(requirement)
EOF
  )
  pip_install "${packages[@]}"
  exit
fi

extras="${1:-}"
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
stamp=".venv/.installed-${extras:-core}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  pip_install -e "$spec" || { echo "setup failed: pip could not install $spec" >&2; exit 1; }
  .venv/bin/python -c "import openllm, torch" || { echo "setup failed: openllm did not install" >&2; exit 1; }
  touch "$stamp"
fi
# OpenLLM's own modules too (each command a test runs imports them afresh; only changed files are recompiled)
.venv/bin/python -m compileall -q -j 0 src >/dev/null 2>&1 || true
