"""Seeds pooled (lkspec.evaluate.seeds): groups, pairs, the mean over seeds and the two-level bootstrap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from lkspec.evaluate.replay import PromptReplay
from lkspec.evaluate.report import Cell, Cost, EvalReport
from lkspec.evaluate.seeds import groups_of, pairs_of, seed_table
from lkspec.proposers import NGRAM

N_PROMPTS = 12


@dataclass(frozen=True)
class R:
    name: str
    loss: str
    seed: int | None
    variant: str | None = None


def _cell(taus: np.ndarray) -> Cell:
    z = np.zeros(2)
    return Cell([PromptReplay(100.0 * t, 100.0, z, z, z, z) for t in taus])  # equal rounds: tau is the mean


def _report(shift: dict[str, list[float]]) -> EvalReport:
    """kl's tau per prompt varies; each other run = kl + its shift (per seed), on the same prompts."""
    rng = np.random.default_rng(0)
    base = {b: 1.3 + 0.2 * rng.random(N_PROMPTS) for b in ("mtbench", "gsm8k")}
    runs = {f"kl-s{s}": 0.0 for s in (0, 1, 2)}
    for lab, per_seed in shift.items():
        runs.update({f"{lab}-s{s}": d for s, d in enumerate(per_seed)})
    runs[NGRAM] = -0.2
    cells = {(lab, T, "sampled", b): _cell(base[b] + d) for lab, d in runs.items() for T in (0.0, 1.0)
             for b in base}
    return EvalReport(target={"name": "t"}, drafts=[(lab, lab) for lab in runs], benchmarks=list(base),
                      temperatures=[0.0, 1.0], rules=["sampled"], k=2, max_new_tokens=8, seeds=[0], cells=cells,
                      cost=Cost(), bootstrap=400)


def _runs(*labels: str) -> list[R]:
    out = []
    for lab in ("kl", *labels):
        loss, _, variant = lab.partition("@")
        out += [R(f"{lab}-s{s}", loss, s, variant or None) for s in (0, 1, 2)]
    return out


def test_groups_and_pairs() -> None:
    groups = groups_of(_runs("lk_hybrid", "lk_tau", "kl@t07"))
    assert [g.label for g in groups] == ["kl", "lk_hybrid", "lk_tau", "kl@t07"]
    assert groups[3].runs == {0: "kl@t07-s0", 1: "kl@t07-s1", 2: "kl@t07-s2"}
    assert pairs_of(groups) == [("lk_hybrid", "kl"), ("lk_tau", "kl"), ("lk_tau", "lk_hybrid"), ("kl@t07", "kl")]


def test_a_consistent_gain_is_found_and_a_seed_dependent_one_is_not_overclaimed() -> None:
    report = _report({"lk_hybrid": [0.05, 0.05, 0.05], "lk_tau": [0.15, 0.0, 0.0]})
    table = seed_table(report, _runs("lk_hybrid", "lk_tau"))
    d = {(x["draft"], x["baseline"], x["benchmark"]): x for x in table.differences if x["temperature"] == 1.0}
    steady, lucky = d[("lk_hybrid", "kl", "mean")], d[("lk_tau", "kl", "mean")]
    assert steady["delta_tau"] == pytest.approx(0.05, rel=1e-9)
    assert steady["ci95"][0] == pytest.approx(0.05, abs=1e-9) and steady["ci95"][1] == pytest.approx(0.05, abs=1e-9)
    assert lucky["delta_tau"] == pytest.approx(0.05, rel=1e-9)  # the same mean gain, from one seed
    assert lucky["ci95"][0] == pytest.approx(0.0, abs=1e-9) and lucky["ci95"][1] == pytest.approx(0.15, abs=1e-9)
    rows = {(r["draft"], r["benchmark"]): r for r in table.rows if r["temperature"] == 0.0}
    assert len(rows[("lk_tau", "gsm8k")]["per_seed"]) == 3 and (NGRAM, "mean") in rows
    assert rows[(NGRAM, "mean")]["tau"] < rows[("kl", "mean")]["tau"]
    text = table.markdown()
    assert "Δ `lk_tau` − `kl`" in text and "**T = 0.7**" not in text and "`ngram`" in text


def test_runs_with_different_seeds_are_refused() -> None:
    report = _report({"lk_hybrid": [0.0, 0.0, 0.0]})
    runs = [r for r in _runs("lk_hybrid") if r.name != "lk_hybrid-s2"]
    with pytest.raises(ValueError, match="pairing needs the same set"):
        seed_table(report, runs)
