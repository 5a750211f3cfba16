"""From per-prompt replay counts to the numbers users read: tau with bootstrap CIs, tables, a plot.

The unit of resampling is the prompt (its seeds pooled), because the replay has already removed the
acceptance coin flips: the only randomness left in tau is which responses y the target produced
(DESIGN §3). tau is a ratio of sums (tokens / rounds) over prompts, as an engine would count it.
Several drafts are replayed on the same y, so their difference is estimated with a *paired* bootstrap
(the same resampled prompts for both), which is much tighter than comparing two separate CIs.
The "mean" column is the unweighted mean over benchmarks, resampled per benchmark (stratified).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lkspec.evaluate.replay import PromptReplay
from lkspec.io import atomic_path, write_json
from lkspec.proposers import NGRAM
from lkspec.speed import Costs, best_k, predicted_speedup

RESULTS_FORMAT = "lkspec-eval/1"
MEAN = "mean"
SHORT = {"mtbench": "MT-bench", "humaneval": "HumanEval", "gsm8k": "GSM8K", "gsm8k_full": "GSM8K (1319)",
         MEAN: "mean"}


def _rng(seed: int, *parts: Any) -> np.random.Generator:
    digest = hashlib.sha256("\0".join(map(str, (seed, *parts))).encode()).hexdigest()
    return np.random.default_rng(int(digest[:15], 16))


def _ci(draws: np.ndarray, level: float = 0.95) -> list[float]:
    lo, hi = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


@dataclass
class Cell:
    """One (draft, temperature, rule, benchmark): per-prompt counts, aligned across drafts."""

    prompts: list[PromptReplay]

    def total(self) -> PromptReplay:
        out = self.prompts[0]
        for p in self.prompts[1:]:
            out = out + p
        return out

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([p.tokens for p in self.prompts]), np.array([p.rounds for p in self.prompts]))


@dataclass
class Cost:
    """Wall time: the one-time target sampling, separate from what each draft costs on top of it."""

    generation_s: float = 0.0
    generated_tokens: int = 0
    cached_samples: int = 0
    generated_samples: int = 0
    target_head_s: float = 0.0  # p from cached hidden states, shared by all drafts
    draft_s: dict[str, float] = field(default_factory=dict)  # teacher-forced pass + replay, per draft

    def per_draft_s(self, label: str) -> float:
        """A draft's replay cost when evaluated alone: its own pass plus the target head it would need."""
        return self.draft_s.get(label, 0.0) + self.target_head_s


@dataclass
class EvalReport:
    target: dict[str, Any]
    drafts: list[tuple[str, str]]  # (label, path)
    benchmarks: list[str]
    temperatures: list[float]
    rules: list[str]
    k: int
    max_new_tokens: int
    seeds: list[int]
    cells: dict[tuple[str, float, str, str], Cell]  # (label, T, rule, benchmark)
    cost: Cost
    bootstrap: int = 2000
    coverage: dict[str, float] = field(default_factory=dict)  # truncated drafts: share of response tokens in the map
    costs: dict[tuple[str, float], Costs] = field(default_factory=dict)  # (label, T): this machine's round costs
    ci_level: float = 0.95
    tau_count: str = "lkspec"  # lkspec.evaluate.replay.TAU_COUNTS
    rows: list[dict[str, Any]] = field(default_factory=list)
    differences: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.rows:
            self._compute()

    # ------------------------------------------------------------------------------------------
    def _compute(self) -> None:
        labels = [lab for lab, _ in self.drafts]
        paths = dict(self.drafts)
        seed = self.seeds[0] if self.seeds else 0
        for T in self.temperatures:
            draws: dict[tuple[str, str, str], np.ndarray] = {}  # (label, rule, bench) -> tau draws
            for bench in self.benchmarks:
                n_units = len(self.cells[(labels[0], T, self.rules[0], bench)].prompts)
                idx = _rng(seed, "bootstrap", bench, T).integers(0, n_units, size=(self.bootstrap, n_units))
                for lab in labels:
                    for rule in self.rules:
                        tok, rnd = self.cells[(lab, T, rule, bench)].arrays()
                        draws[(lab, rule, bench)] = tok[idx].sum(1) / np.maximum(rnd[idx].sum(1), 1e-12)
            for lab in labels:
                for rule in self.rules:
                    per_bench = []
                    for bench in self.benchmarks:
                        tot = self.cells[(lab, T, rule, bench)].total()
                        row = self._row(lab, paths[lab], bench, T, rule, tot, draws[(lab, rule, bench)])
                        per_bench.append(row)
                        self.rows.append(row)
                    mean_draws = np.mean([draws[(lab, rule, b)] for b in self.benchmarks], axis=0)
                    self.rows.append(self._mean_row(per_bench, mean_draws))
            for lab, base in self.comparisons():
                for rule in self.rules:
                    diffs = []
                    for bench in self.benchmarks:
                        d = draws[(lab, rule, bench)] - draws[(base, rule, bench)]
                        diffs.append(d)
                        self.differences.append(self._diff(lab, base, bench, T, rule, d))
                    self.differences.append(self._diff(lab, base, MEAN, T, rule, np.mean(diffs, axis=0)))

    def comparisons(self) -> list[tuple[str, str]]:
        """(challenger, baseline) pairs with a paired difference: every other proposer against the first draft,
        and every draft (alone or combined) against the n-gram lookup when it was scored."""
        labels = [lab for lab, _ in self.drafts]
        pairs = [(lab, labels[0]) for lab in labels[1:] if lab != NGRAM]
        if NGRAM in labels and labels[0] != NGRAM:
            pairs += [(lab, NGRAM) for lab in labels if lab != NGRAM]
        return pairs

    def _row(self, lab: str, path: str, bench: str, T: float, rule: str, tot: PromptReplay,
             draws: np.ndarray) -> dict[str, Any]:
        with np.errstate(invalid="ignore", divide="ignore"):
            cond = tot.accepted / tot.tried
            cum = tot.accepted / tot.rounds
            alpha = tot.alpha_sum / tot.alpha_count
        return {
            "draft": lab, "draft_path": path, "benchmark": bench, "temperature": float(T), "rule": rule,
            "tau": float(tot.tau), "ci95": _ci(draws, self.ci_level),
            "num_prompts": len(self.cells[(lab, T, rule, bench)].prompts), "num_tokens": round(tot.tokens),
            "acceptance": _floats(cond), "acceptance_cumulative": _floats(cum), "alpha": _floats(alpha),
            **self._speed(lab, T, cum),
        }

    def _speed(self, lab: str, T: float, cumulative: Sequence[float]) -> dict[str, Any]:
        """The cost model's speed-up of `lkspec generate` at the eval's K and at the best K <= it."""
        c = self.costs.get((lab, T))
        if c is None:
            return {}
        cum = [0.0 if np.isnan(v) else float(v) for v in cumulative]  # a position no round reached accepts nothing
        k = best_k(cum, c, self.k)
        return {"predicted_speedup": {"k": self.k, "at_k": predicted_speedup(cum, self.k, c), "best_k": k,
                                      "at_best_k": predicted_speedup(cum, k, c)}}

    def _mean_row(self, rows: list[dict[str, Any]], draws: np.ndarray) -> dict[str, Any]:
        first = rows[0]

        def avg(key: str) -> list[float]:
            with warnings.catch_warnings():  # a position no response reached is NaN everywhere: stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                return _floats(np.nanmean([r[key] for r in rows], axis=0))

        return {
            **{k: first[k] for k in ("draft", "draft_path", "temperature", "rule")},
            "benchmark": MEAN,
            "tau": float(np.mean([r["tau"] for r in rows])), "ci95": _ci(draws, self.ci_level),
            "num_prompts": sum(r["num_prompts"] for r in rows), "num_tokens": sum(r["num_tokens"] for r in rows),
            "acceptance": avg("acceptance"), "acceptance_cumulative": avg("acceptance_cumulative"),
            "alpha": avg("alpha"),
            **self._speed(first["draft"], first["temperature"], avg("acceptance_cumulative")),
        }

    def _diff(self, lab: str, base: str, bench: str, T: float, rule: str, d: np.ndarray) -> dict[str, Any]:
        point = self.row(lab, bench, T, rule)["tau"] - self.row(base, bench, T, rule)["tau"]
        return {"draft": lab, "baseline": base, "benchmark": bench, "temperature": float(T), "rule": rule,
                "delta_tau": float(point), "ci95": _ci(d, self.ci_level)}

    # ------------------------------------------------------------------------------------------
    def row(self, label: str, benchmark: str, temperature: float, rule: str) -> dict[str, Any]:
        for r in self.rows:
            if (r["draft"], r["benchmark"], r["temperature"], r["rule"]) == (label, benchmark, temperature, rule):
                return r
        raise KeyError((label, benchmark, temperature, rule))

    def to_json(self) -> dict[str, Any]:
        """The results file (format `lkspec-eval/1`, read by `lkspec export --eval`)."""
        return {
            "format": RESULTS_FORMAT,
            "target": self.target,
            "k": self.k,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seeds[0] if len(self.seeds) == 1 else list(self.seeds),
            "tau_count": self.tau_count,
            "token_map_coverage": self.coverage,
            **({"speed": self._speed_json()} if self.costs else {}),
            "rows": self.rows,
            "differences": self.differences,
        }

    def _speed_json(self) -> dict[str, Any]:
        some = next(iter(self.costs.values()))  # the pass timing is one, shared by every proposer
        return {"pass_seconds": list(some.passes), "relative_pass_cost": some.relative(),
                "proposers": [{"draft": lab, "temperature": T, "propose_seconds_per_token": c.propose_per_token,
                               "accept_seconds_per_round": c.overhead} for (lab, T), c in self.costs.items()]}

    def write_json(self, path: str | Path) -> Path:
        write_json(path, self.to_json())
        return Path(path)

    # ------------------------------------------------------------------------------------------
    def markdown(self) -> str:
        """Tables shaped like the paper's / model cards': rows = drafts (x rules), columns = T x benchmark."""
        benches = [*self.benchmarks, MEAN]
        cols = [f"T={T:g} {SHORT.get(b, b)}" for T in self.temperatures for b in benches]
        labels = [lab for lab, _ in self.drafts]
        lines = [
            f"## Acceptance length tau (K = {self.k}, bonus token included; 95% bootstrap CI over prompts)",
            "",
            f"Target `{self.target['name']}`, max {self.max_new_tokens} new tokens, seeds {self.seeds}; "
            "`sampled` = drafts sampled from q and accepted w.p. min(1, p/q); "
            "`greedy` = argmax drafts (vLLM's rule). At T=0 both rules are the same. "
            + ("Rounds counted from the last prompt token (lkspec's count)." if self.tau_count == "lkspec" else
               "Rounds counted as vLLM does: after the prefill emitted the first response token."),
            "",
            "| draft | rule | " + " | ".join(cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        for lab in labels:
            for rule in self.rules:
                cells = []
                for T in self.temperatures:
                    for b in benches:
                        r = self.row(lab, b, T, rule)
                        cells.append(f"{r['tau']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
                lines.append(f"| {lab} | {rule} | " + " | ".join(cells) + " |")
        pairs = self.comparisons()
        for base in dict.fromkeys(b for _, b in pairs):
            lines += ["", f"## Paired difference in tau vs `{base}` (same target samples; 95% CI)", "",
                      "| draft | rule | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
            for lab in (c for c, b in pairs if b == base):
                for rule in self.rules:
                    cells = []
                    for T in self.temperatures:
                        for b in benches:
                            d = self.difference(lab, base, b, T, rule)
                            cells.append(f"{d['delta_tau']:+.3f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]")
                    lines.append(f"| {lab} | {rule} | " + " | ".join(cells) + " |")
        if self.costs:
            lines += self._speed_markdown(labels, cols, benches)
        pos = " | ".join(f"k={i}" for i in range(1, self.k + 1))
        lines += ["", "## Per-position acceptance (mean over benchmarks): conditional / cumulative, and alpha", "",
                  f"| draft | rule | T | quantity | {pos} |", "|---|---|---|---|" + "---|" * self.k]
        for lab in labels:
            for rule in self.rules:
                for T in self.temperatures:
                    r = self.row(lab, MEAN, T, rule)
                    for name, key in (("conditional", "acceptance"), ("cumulative", "acceptance_cumulative"),
                                      ("alpha", "alpha")):
                        vals = " | ".join(f"{v:.3f}" for v in r[key])
                        lines.append(f"| {lab} | {rule} | {T:g} | {name} | {vals} |")
        lines += ["", "## Samples and cost", "",
                  "| T | " + " | ".join(SHORT.get(b, b) for b in self.benchmarks) + " |",
                  "|---|" + "---|" * len(self.benchmarks)]
        for T in self.temperatures:
            cells = []
            for b in self.benchmarks:
                r = self.row(labels[0], b, T, self.rules[0])
                cells.append(f"{r['num_prompts']} prompts, {r['num_tokens']} tokens")
            lines.append(f"| {T:g} | " + " | ".join(cells) + " |")
        c = self.cost
        lines += ["", f"- one-time target sampling: {c.generation_s:.1f} s for {c.generated_tokens} new tokens "
                  f"({c.generated_samples} responses generated, {c.cached_samples} loaded from the cache)",
                  f"- target head on cached states (shared by all drafts): {c.target_head_s:.1f} s"]
        for lab in labels:
            lines.append(f"- draft `{lab}`: {c.draft_s.get(lab, 0.0):.1f} s teacher-forced pass + replay "
                         f"({c.per_draft_s(lab):.1f} s alone)")
        for lab, share in self.coverage.items():
            lines.append(f"- draft `{lab}` covers {share:.1%} of the evaluated response tokens with its token map "
                         f"(no draft position can accept the rest)")
        return "\n".join(lines) + "\n"

    def _speed_markdown(self, labels: list[str], cols: list[str], benches: list[str]) -> list[str]:
        some = next(iter(self.costs.values()))
        rel = ", ".join(f"{v:.2f}" for v in some.relative()[1:])
        hot = self.temperatures[-1]
        per = "; ".join(f"`{lab}` {1e3 * c.propose_per_token:.1f} ms" for (lab, t), c in self.costs.items() if t == hot)
        lines = ["", "## Predicted speed-up of `lkspec generate` over plain decoding, on this machine", "",
                 f"Cost model (lkspec.speed): a round is one target pass over K + 1 tokens ({rel} x a one-token "
                 f"pass of {1e3 * some.passes[0]:.0f} ms for K = 1..{self.k}, measured here) plus the proposal "
                 f"(per drafted token at T={hot:g}: {per}) plus the acceptance step; speed-up = "
                 "tau(K) x one-token pass / round. Each cell: at K = "
                 f"{self.k} / at the best K (`lkspec generate --k auto` chooses it as it goes).", "",
                 "| draft | rule | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for lab in labels:
            for rule in self.rules:
                cells = []
                for T in self.temperatures:
                    for b in benches:
                        sp = self.row(lab, b, T, rule)["predicted_speedup"]
                        cells.append(f"{sp['at_k']:.2f}x / {sp['at_best_k']:.2f}x (K={sp['best_k']})")
                lines.append(f"| {lab} | {rule} | " + " | ".join(cells) + " |")
        return lines

    def difference(self, lab: str, base: str, bench: str, T: float, rule: str) -> dict[str, Any]:
        for d in self.differences:
            if (d["draft"], d["baseline"], d["benchmark"], d["temperature"], d["rule"]) == (lab, base, bench, T, rule):
                return d
        raise KeyError((lab, base, bench, T, rule))

    def write_markdown(self, path: str | Path) -> Path:
        with atomic_path(path) as tmp:
            tmp.write_text(self.markdown())
        return Path(path)

    def plot(self, path: str | Path) -> Path:
        """Per-position acceptance (mean over benchmarks): conditional solid, cumulative dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(T, rule) for T in self.temperatures for rule in self.rules
                  if not (T == 0 and rule != self.rules[0])]  # at T = 0 the rules coincide
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
        x = np.arange(1, self.k + 1)
        for ax, (T, rule) in zip(axes[0], panels, strict=True):
            for i, (lab, _) in enumerate(self.drafts):
                r = self.row(lab, MEAN, T, rule)
                color = f"C{i}"
                ax.plot(x, r["acceptance"], "-o", color=color, label=f"{lab} (tau {r['tau']:.2f})")
                ax.plot(x, r["acceptance_cumulative"], "--", color=color, alpha=0.7)
            ax.set_title(f"T = {T:g}" + ("" if T == 0 else f", {rule} drafts"))
            ax.set_xlabel("draft position k")
            ax.set_xticks(x)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("acceptance (solid: conditional, dashed: cumulative)")
        axes[0][-1].legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        return Path(path)


def _floats(a: Sequence[float] | np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64)]
