"""`lkspec demo --quick` end to end on the embedded target: the report's structure and sane tau values.

This is the README's first command at smoke-test size; CI runs it (marked slow). Its numbers mean nothing,
only that every stage ran and produced what the next one and the user need.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from lkspec.cli import main

pytestmark = pytest.mark.slow
K = 6


def run_demo(out: Path) -> float:
    t0 = time.perf_counter()
    try:
        main(["demo", "--quick", "--all", "--quiet", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None), f"lkspec demo --quick exited {e.code}"
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, float]]:
    out = tmp_path_factory.mktemp("demo") / "lkspec-demo"
    yield out, run_demo(out)
    shutil.rmtree(out.parent, ignore_errors=True)  # ~3.6 GB, mostly the vLLM exports: not left for later tests


def test_report_has_the_table_verdict_and_plots(demo_out: tuple[Path, float]) -> None:
    out, _ = demo_out
    report = (out / "report.md").read_text()
    for heading in ("# lkspec demo --quick", "### Verdict", "Acceptance length tau (K = 6", "Paired difference",
                    "## Training curves", "## Exported drafts", "## Stage timings"):
        assert heading in report, heading
    assert "`mlp-lk_hybrid` − `mlp-kl`" in report and "`medusa-lk_hybrid` − `medusa-kl`" in report
    assert "(eta 3)" in report and "(eta 10)" in report
    assert "Predicted `lkspec generate` speed-up over plain decoding on this machine" in report
    assert re.search(r"- T=1: `[\w+-]+` \d+\.\d\dx at K = [1-6] \(at K = 6: \d+\.\d\dx\)", report)
    table = [line for line in report.splitlines() if line.startswith("| mlp-")]
    assert {line.split("|")[2].strip() for line in table} >= {"sampled", "greedy"}
    for png in ("metrics.png", "eval/mlp.png", "eval/medusa.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arch", ["mlp", "medusa"])
def test_every_tau_is_in_range_with_a_ci(demo_out: tuple[Path, float], arch: str) -> None:
    out, _ = demo_out
    res = json.loads((out / "eval" / f"{arch}.json").read_text())
    assert res["format"] == "lkspec-eval/1" and res["k"] == K
    cells = {(r["draft"], r["benchmark"], r["temperature"], r["rule"]) for r in res["rows"]}
    for draft in (f"{arch}-kl", f"{arch}-lk_hybrid"):
        for bench in ("mtbench", "humaneval", "gsm8k", "mean"):
            for T in (0.0, 1.0):
                for rule in ("sampled", "greedy"):
                    assert (draft, bench, T, rule) in cells
    for r in res["rows"]:
        lo, hi = r["ci95"]
        assert 1.0 <= lo <= r["tau"] + 1e-9 and r["tau"] <= hi + 1e-9 and hi <= K + 1, r
        assert r["num_prompts"] > 0 and len(r["acceptance"]) == K
        sp = r["predicted_speedup"]
        assert 1 <= sp["best_k"] <= K and sp["at_best_k"] >= sp["at_k"] > 0, sp
    assert len(res["speed"]["pass_seconds"]) == K + 1


def test_exports_are_vllm_layouts_with_cards(demo_out: tuple[Path, float]) -> None:
    out, _ = demo_out
    kinds = {"mlp": ("mlp_speculator", "head."), "medusa": ("medusa", "lm_heads.")}
    report = (out / "report.md").read_text()
    for name in ("medusa-kl", "medusa-lk_hybrid"):  # the demo's MEDUSA has a token map: vLLM 0.32 cannot load it
        assert not (out / "export" / name).exists() and f"- `{name}`: not exported (vLLM 0.32" in report
    for name in ("mlp-kl", "mlp-lk_hybrid"):
        model_type, tensor = kinds[name.split("-")[0]]
        d = out / "export" / name
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == model_type and cfg.get("n_predict", cfg.get("num_heads")) == K
        with safe_open(d / "model.safetensors", "pt") as f:
            assert any(k.startswith(tensor) for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
        card = (d / "README.md").read_text()
        assert model_type in card and "| T = 0 | T = 1, sampled drafts | T = 1, greedy drafts |" in card
        assert re.search(r"\| \*\*mean\*\* \| \d\.\d\d \[", card), "the card's tau table has no mean row"


def test_rerun_reuses_every_finished_stage(demo_out: tuple[Path, float]) -> None:
    out, first = demo_out
    features = sorted(p.stat().st_mtime_ns for p in (out / "data" / "features").glob("*"))
    weights = (out / "runs" / "mlp-kl" / "model.safetensors").stat().st_mtime_ns
    second = run_demo(out)
    assert sorted(p.stat().st_mtime_ns for p in (out / "data" / "features").glob("*")) == features
    assert (out / "runs" / "mlp-kl" / "model.safetensors").stat().st_mtime_ns == weights
    assert second < first, (second, first)
