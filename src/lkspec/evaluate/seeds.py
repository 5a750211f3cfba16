"""Training seeds pooled: a loss's tau over several seeds, and its paired difference against the baseline.

One training run is one draw of the training randomness (data order, held-out split, initial weights where
they are random), so "LK beats KL" is a claim about the mean over seeds, not about one pair of runs. Every
run of one architecture is replayed on the same target samples (`EvalReport`), and a loss's run of seed s is
paired with the baseline's run of seed s. The CI comes from a two-level bootstrap: each replicate resamples
the training seeds (with replacement, shared by every group and benchmark) and, inside each benchmark, the
prompts (shared by every run: the pairing); the "mean" column averages the benchmarks within a replicate.
With 3 seeds the seed level is coarse, so the intervals are honest rather than tight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lkspec.evaluate.report import MEAN, SHORT, EvalReport, _ci, _rng
from lkspec.losses import BASELINE_LOSS, DEFAULT_LOSS
from lkspec.proposers import NGRAM


class Run(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def loss(self) -> str: ...

    @property
    def seed(self) -> int | None: ...

    @property
    def variant(self) -> str | None: ...


@dataclass(frozen=True)
class Group:
    """The runs of one (loss, variant) over seeds: seed -> run label in the report."""

    label: str
    runs: dict[int, str]


def groups_of(runs: Sequence[Run]) -> list[Group]:
    groups: dict[str, dict[int, str]] = {}
    for r in runs:
        label = r.loss + (f"@{r.variant}" if r.variant else "")
        groups.setdefault(label, {})[r.seed if r.seed is not None else 0] = r.name
    return [Group(label, runs) for label, runs in groups.items()]


def pairs_of(groups: Sequence[Group]) -> list[tuple[str, str]]:
    """(challenger, baseline): every loss vs the baseline loss and vs the default (the paper's) loss, and every
    variant vs the same loss trained the plain way."""
    labels = [g.label for g in groups]
    out = []
    for lab in labels:
        loss, _, variant = lab.partition("@")
        if variant:
            if loss in labels:
                out.append((lab, loss))
            continue
        if lab != BASELINE_LOSS:
            out += [(lab, base) for base in dict.fromkeys((BASELINE_LOSS, DEFAULT_LOSS))
                    if base != lab and base in labels]
    return out


@dataclass
class SeedTable:
    temperatures: list[float]
    benchmarks: list[str]  # the report's, then MEAN
    rule: str
    seeds: list[int]
    rows: list[dict[str, Any]]  # label, T, benchmark, tau (mean over seeds), ci95, per_seed
    differences: list[dict[str, Any]]  # draft, baseline, T, benchmark, delta_tau, relative, ci95

    def markdown(self) -> str:
        heads = [SHORT.get(b, b) for b in self.benchmarks]
        lines = [f"Seeds {', '.join(map(str, self.seeds))} pooled; `{self.rule}` drafts; tau = mean over seeds "
                 f"[95 % CI, bootstrap over seeds and prompts]; Δ paired by seed.", ""]
        for T in self.temperatures:
            lines += [f"**T = {T:g}**", "", "| proposer | " + " | ".join(heads) + " |",
                      "|---" * (len(heads) + 1) + "|"]
            labels = list(dict.fromkeys(r["draft"] for r in self.rows if r["temperature"] == T))
            for lab in labels:
                cells = [self._get(self.rows, lab, T, b) for b in self.benchmarks]
                lines.append(f"| `{lab}` | " + " | ".join(f"{c['tau']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
                                                          for c in cells) + " |")
            for d in dict.fromkeys((x["draft"], x["baseline"]) for x in self.differences if x["temperature"] == T):
                cells = [self._get(self.differences, d[0], T, b, d[1]) for b in self.benchmarks]
                lines.append(f"| Δ `{d[0]}` − `{d[1]}` | " + " | ".join(
                    f"{c['delta_tau']:+.4f} ({100 * c['relative']:+.2f} %) [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                    for c in cells) + " |")
            lines.append("")
        return "\n".join(lines)

    @staticmethod
    def _get(rows: list[dict[str, Any]], lab: str, T: float, bench: str, base: str | None = None) -> dict[str, Any]:
        return next(r for r in rows if r["draft"] == lab and r["temperature"] == T and r["benchmark"] == bench
                    and (base is None or r["baseline"] == base))

    def to_json(self) -> dict[str, Any]:
        return {"temperatures": self.temperatures, "benchmarks": self.benchmarks, "rule": self.rule,
                "seeds": self.seeds, "rows": self.rows, "differences": self.differences}


def seed_table(report: EvalReport, runs: Sequence[Run], *, rule: str = "sampled", bootstrap: int | None = None,
               seed: int = 0) -> SeedTable:
    """Pool the report's runs over their seeds (see the module docstring); `ngram` is a row of its own."""
    groups = groups_of(runs)
    seeds = sorted(set().union(*(g.runs for g in groups)))
    for g in groups:
        if sorted(g.runs) != seeds:
            raise ValueError(f"{g.label} has seeds {sorted(g.runs)}, the others {seeds}: pairing needs the same set")
    labels = [lab for lab, _ in report.drafts]
    B = bootstrap or report.bootstrap
    S = len(seeds)
    rows, diffs = [], []
    for T in report.temperatures:
        seed_idx = _rng(seed, "seeds", T).integers(0, S, size=(B, S))
        point: dict[tuple[str, str], float] = {}
        draws: dict[tuple[str, str], np.ndarray] = {}
        for bench in report.benchmarks:
            n = len(report.cells[(labels[0], T, rule, bench)].prompts)
            idx = _rng(seed, "prompts", bench, T).integers(0, n, size=(B, n))

            def tau_draws(label: str, idx: np.ndarray = idx, bench: str = bench, T: float = T
                          ) -> tuple[float, np.ndarray]:
                tok, rnd = report.cells[(label, T, rule, bench)].arrays()
                return float(tok.sum() / rnd.sum()), tok[idx].sum(1) / np.maximum(rnd[idx].sum(1), 1e-12)

            for g in groups:
                per = [tau_draws(g.runs[s]) for s in seeds]
                by_seed = np.stack([d for _, d in per])  # [S, B]
                point[(g.label, bench)] = float(np.mean([p for p, _ in per]))
                draws[(g.label, bench)] = by_seed[seed_idx, np.arange(B)[:, None]].mean(1)
                rows.append({"draft": g.label, "temperature": T, "benchmark": bench, "tau": point[(g.label, bench)],
                             "ci95": _ci(draws[(g.label, bench)]), "per_seed": [p for p, _ in per]})
            if NGRAM in labels:
                p, d = tau_draws(NGRAM)
                point[(NGRAM, bench)], draws[(NGRAM, bench)] = p, d
                rows.append({"draft": NGRAM, "temperature": T, "benchmark": bench, "tau": p, "ci95": _ci(d),
                             "per_seed": [p]})
        for lab in [g.label for g in groups] + ([NGRAM] if NGRAM in labels else []):
            m = float(np.mean([point[(lab, b)] for b in report.benchmarks]))
            d = np.mean([draws[(lab, b)] for b in report.benchmarks], axis=0)
            rows.append({"draft": lab, "temperature": T, "benchmark": MEAN, "tau": m, "ci95": _ci(d), "per_seed": []})
            point[(lab, MEAN)], draws[(lab, MEAN)] = m, d
        for lab, base in pairs_of(groups):
            for bench in [*report.benchmarks, MEAN]:
                delta = point[(lab, bench)] - point[(base, bench)]
                diffs.append({"draft": lab, "baseline": base, "temperature": T, "benchmark": bench,
                              "delta_tau": delta, "relative": delta / point[(base, bench)],
                              "ci95": _ci(draws[(lab, bench)] - draws[(base, bench)])})
    return SeedTable(list(report.temperatures), [*report.benchmarks, MEAN], rule, seeds, rows, diffs)
