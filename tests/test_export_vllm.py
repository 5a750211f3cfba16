"""Exports against vLLM 0.32.0's own MLPSpeculator / Medusa / Eagle3LlamaForCausalLM classes (CPU), via
scripts/check_vllm_load.sh.

Opt-in: needs a separate venv with vLLM (the script creates it: ~1.5 min, ~2.2 GB, PyPI access) and takes
about a minute once the venv exists. Run with `LKSPEC_VLLM_CHECK=1 python -m pytest -m vllm`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.vllm
@pytest.mark.skipif(os.environ.get("LKSPEC_VLLM_CHECK") != "1", reason="set LKSPEC_VLLM_CHECK=1 to run vLLM's loaders")
def test_vllm_own_classes_load_our_exports(tmp_path: Path) -> None:
    report = tmp_path / "vllm-check.json"
    proc = subprocess.run([str(ROOT / "scripts" / "check_vllm_load.sh"), "--json", str(report)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["vllm"] == "0.32.0" and result["ok"]
    cases = {c["case"]: c for c in result["cases"]}
    assert {c["method"] for c in cases.values()} == {"mlp_speculator", "medusa", "eagle3"}
    for c in cases.values():
        assert c["loaded"] == c["vllm_params"] and c["rel_gap_vs_lkspec_import"] < 1e-5, c
    assert cases["MLP tied + scale_input"]["ignored_tied_copies"] == 19  # written for vLLM 0.32's per-stage heads
    assert {c["format"] for c in cases.values() if c["method"] == "eagle3"} == {"vllm", "speculators"}
