#!/usr/bin/env bash
# Load lkspec exports with vLLM 0.32.0's own classes, on CPU (DESIGN §6, reference/resources.md §4).
#
# vLLM 0.32.0 is the last release with both `medusa` and `mlp_speculator` (0.33 removed them). Its CUDA wheel
# cannot run speculative decoding on CPU, but its `MLPSpeculator` and `Medusa` classes can be built and their
# `load_weights` fed our files. That is the check: every vLLM parameter comes from our tensors, none of ours
# is ignored, and vLLM's per-head outputs equal lkspec's.
#
# Usage: scripts/check_vllm_load.sh [--install-only] [vllm_check.py flags]
#   LKSPEC_VLLM_VENV  venv to create/use (default .cache/vllm-venv in the repo root; gitignored)
#   PYTHON            interpreter for a new venv (default python3; 3.10-3.12)
# The venv gets vLLM 0.32.0 --no-deps, CPU torch 2.13.0 (local wheel), transformers 5.19.*, and only the
# extra packages vLLM imports; never torchvision/torchaudio/torchcodec (they fail beside the CPU torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LKSPEC_VLLM_VENV:-.cache/vllm-venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.lkspec-vllm-0.32.0-ok"
INSTALL_ONLY=0
if [ "${1:-}" = "--install-only" ]; then INSTALL_ONLY=1; shift; fi

if [ ! -f "$STAMP" ]; then
  t0=$(date +%s)
  echo "[check_vllm_load] creating $VENV with vLLM 0.32.0 (--no-deps, CPU torch); takes a few minutes" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${PIP[@]}" install --upgrade pip
  "${PIP[@]}" install torch==2.13.0 "transformers==5.19.*" safetensors
  "${PIP[@]}" install --no-deps vllm==0.32.0
  "${PIP[@]}" install pyzmq msgspec cachetools blake3 py-cpuinfo cloudpickle sentencepiece protobuf \
    pybase64 cbor2 ijson setproctitle einops partial-json-parser prometheus_client openai \
    tiktoken python-json-logger watchfiles aiohttp openai-harmony pillow psutil pydantic \
    fastapi requests uvloop llguidance apache-tvm-ffi
  "${PIP[@]}" install --no-deps xgrammar   # with its deps it pulls triton (1 GB), not needed here
  for bad in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -m pip show -q "$bad" >/dev/null 2>&1; then
      echo "[check_vllm_load] $bad got into $VENV; it breaks the CPU torch: remove $VENV and rerun" >&2
      exit 1
    fi
  done
  touch "$STAMP"
  echo "[check_vllm_load] venv ready in $(( $(date +%s) - t0 )) s" >&2
fi
[ "$INSTALL_ONLY" = 1 ] && exit 0

# lkspec from this checkout (its light imports: torch, pydantic, safetensors are all in the venv).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_TARGET_DEVICE=cpu
t1=$(date +%s)
"$VENV/bin/python" scripts/vllm_check.py "$@"
echo "[check_vllm_load] check finished in $(( $(date +%s) - t1 )) s" >&2
