#!/usr/bin/env bash
# The main job on the embedded default model: `guardtune demo` trains the example adapters (reused
# when present), builds the script store and the knowledge index, serves them on 127.0.0.1 and plays
# a guarded conversation. DEMO_ARGS passes flags through, e.g. DEMO_ARGS=--once for CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/guardtune" demo ${DEMO_ARGS:-}
