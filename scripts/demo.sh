#!/usr/bin/env bash
# Set up OpenLLM and run the main job on its embedded default: prepare the bundled tiny
# Shakespeare corpus, train the `tiny` preset on the CPU with validation, best checkpoint and
# early stopping, then print a sample. Re-running continues (or reports) the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
run="${OPENLLM_DEMO_DIR:-runs/demo}"
.venv/bin/openllm train --output-dir "$run" --model-size tiny --device cpu --early-stopping-patience 3 \
  --resume auto --sample-tokens 0
echo
echo "=== sample from $run/best_model.pt ==="
.venv/bin/openllm generate --model "$run" --prompt "ROMEO:" --max-new-tokens 150 --seed 0
