#!/usr/bin/env bash
# The main job on the embedded default model: train the example sales adapter (reused when it is
# already there) and show the base model's replies beside the adapter's.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STEPS=${DEMO_STEPS:-40}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -f adapters/sales/guardtune.json ]; then
  echo "demo: adapters/sales exists; reusing it (delete it to retrain)" >&2
else
  echo "demo: training the example adapter for $STEPS steps (about 7 s/step on 2 cores)" >&2
  "$VENV/bin/train" examples/train_lora.yaml "max_steps=$STEPS" generation_samples=0
fi
echo "demo: base model vs adapter on held-out style questions" >&2
"$VENV/bin/guardtune" eval adapters/sales examples/data/sales_chat_eval.jsonl --samples 4
