"""The pipeline's `report.md`: the seed-card tau table with CIs, the paired LK - KL verdict, the training
curves, timings and where the exported drafts are. It states the verdict from the CI, not the point
estimate, because at demo scale a difference of a few hundredths of a token is often noise.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from lkspec.evaluate.report import MEAN
from lkspec.io import atomic_path
from lkspec.losses import get_loss
from lkspec.pipeline import PipelineResult
from lkspec.proposers import NGRAM
from lkspec.train.metrics import read_metrics

EVAL_KINDS = ("init", "epoch", "stop")  # metrics.jsonl records with a held-out evaluation
EPS = 1e-9  # bootstrap bounds of identical drafts differ from zero by rounding only
NIL = 0.01  # tokens: a tau difference this small is no speed-up anyone can measure in serving


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def verdict(report: Any, T: float, rule: str, against: str | None = None,
            challengers: set[str] | None = None) -> list[str]:
    """One line per challenger: the mean paired difference and whether its 95% CI excludes zero.

    `against`: the baseline (default: the first draft, the loss baseline); `challengers`: which rows to
    compare with it (default: every row that has a difference against it).
    """
    base_label = against or report.drafts[0][0]
    lines = []
    for d in report.differences:
        if d["benchmark"] != MEAN or d["temperature"] != T or d["rule"] != rule or d["baseline"] != base_label:
            continue
        if challengers is not None and d["draft"] not in challengers:
            continue
        lo, hi = d["ci95"]
        base = report.row(d["baseline"], MEAN, T, rule)["tau"]
        rel = 100 * d["delta_tau"] / base if base else math.nan
        if hi - lo < NIL and abs(d["delta_tau"]) < NIL / 2:
            word = f"practically identical (the whole 95% CI is within {NIL} tokens)"
        elif lo > EPS:
            word = "better: the 95% CI excludes zero"
        elif hi < -EPS:
            word = "worse: the 95% CI excludes zero"
        else:
            word = "no significant difference at this scale (the 95% CI contains zero)"
        lines.append(f"- T={T:g}, {rule} drafts: `{d['draft']}` − `{d['baseline']}` = {d['delta_tau']:+.4f} tokens "
                     f"({rel:+.2f} %), 95% CI [{lo:+.4f}, {hi:+.4f}] — {word}")
    return lines


def plot_metrics(runs: dict[str, Path], path: Path) -> Path:
    """Training simulated tau over steps, held-out simulated tau per epoch, final held-out alpha per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, (name, run) in enumerate(runs.items()):
        recs = read_metrics(run / "metrics.jsonl")
        steps = [r for r in recs if r.get("kind") == "step"]
        evals = [r for r in recs if r.get("kind") in EVAL_KINDS and r.get("heldout")]
        c = f"C{i}"
        if steps:
            axes[0].plot([r["step"] for r in steps], [r["train"]["tau"] for r in steps], color=c, alpha=0.8,
                         label=name)
        if evals:
            axes[1].plot([r["step"] for r in evals], [r["heldout"]["tau"] for r in evals], "-o", color=c, label=name)
            alpha = [a if a is not None else math.nan for a in evals[-1]["heldout"]["alpha"]]
            axes[2].plot(range(1, len(alpha) + 1), alpha, "-o", color=c, label=name)
    axes[0].set(title="training batches: simulated tau", xlabel="step", ylabel="1 + sum_k prod_j<=k alpha_j")
    axes[1].set(title="held-out: simulated tau (epoch ends)", xlabel="step")
    axes[2].set(title="held-out alpha per head (last epoch)", xlabel="head k", ylabel="alpha_k")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def _heldout(run: Path) -> tuple[int, float | None, list[float]]:
    recs = [r for r in read_metrics(run / "metrics.jsonl") if r.get("kind") in EVAL_KINDS]
    if not recs:
        return 0, None, []
    best = max(recs, key=lambda r: (r.get("heldout") or r["train"])["tau"])
    part = best.get("heldout") or best["train"]
    return best["step"], part["tau"], [a if a is not None else math.nan for a in part["alpha"]]


def write_report(res: PipelineResult, *, command: str, total_s: float, title: str = "lkspec demo") -> Path:
    """report.md + metrics.png in the output folder; returns the report path."""
    out = res.out
    cfg = res.config
    plot_metrics(res.runs, out / "metrics.png")
    ds = res.data_stats
    lines = [
        f"# {title}: KL vs LK losses for speculative-decoding drafts",
        "",
        f"Command: `{command}` — machine: {machine()} — total {total_s / 60:.1f} min.",
        "",
        f"Target `{cfg.target}`; training data: {ds.get('docs')} responses ("
        + "; ".join(f"{p.limit or 'all'} prompts from `{p.source}`{f' past the first {p.skip}' if p.skip else ''} "
                    f"(seed {p.seed}) answered by the target itself at "
                    f"T = {r.temperature:g}, at most {r.max_new_tokens} new tokens" for _, p, r in cfg.data.parts())
        + f"): {ds.get('tokens', 0):,} tokens, {ds.get('loss_tokens', 0):,} response tokens trained on.",
        "",
    ]
    for short, report in res.reports.items():
        names = [lab for lab, _ in report.drafts if lab in res.runs]
        lines += [f"## {short}: {' vs '.join(f'`{lab}`' for lab, _ in report.drafts)}", ""]
        for name in names:
            run = res.runs[name]
            step, tau, alpha = _heldout(run)
            params = res.draft_params.get(name)
            train = cfg.train_config(cfg.run(name), out)
            a = " / ".join(f"{x:.3f}" for x in alpha)
            lines.append(f"- `{name}`: {train.draft.arch}, loss `{train.loss.name}`"
                         + (f" (eta {train.eta:g})" if get_loss(train.loss.name).uses_eta else "")
                         + (f", {params:,} parameters" if params else "")
                         + f"; {train.epochs} epochs × batch {train.data.batch_size}, lr {train.optim.lr:g}, seed "
                         f"{train.seed}; selected at step {step}: held-out simulated tau {tau:.3f}, alpha per head {a}")
        if short in res.seed_tables:  # several seeds / variants: the pooled, seed-paired comparison first
            lines += ["", "### Losses pooled over training seeds", "", res.seed_tables[short].markdown()]
        lines += ["", "### Verdict (mean over benchmarks, paired on the same target samples)", ""]
        lines += verdicts(report, names)
        lines += ["", report.markdown().replace("\n## ", "\n### "), f"![acceptance](eval/{short}.png)", ""]
    lines += ["## Training curves", "", "![metrics](metrics.png)", "",
              "## Exported drafts (vLLM layout + model card)", ""]
    for name, path in res.exports.items():
        lines.append(f"- `{name}`: `{path.relative_to(out)}/` (config.json, model.safetensors, README.md, "
                     f"provenance.json)")
    for name, why in res.not_exported.items():
        lines.append(f"- `{name}`: not exported ({why}); its run directory `runs/{name}` serves with "
                     f"`lkspec generate`")
    lines += ["", "## Stage timings", "", "| stage | seconds | note |", "|---|---|---|"]
    for st in res.times:
        lines.append(f"| {st.name} | {st.seconds:.1f} | {st.note} |")
    lines += ["", "Reproduce: rerun the command; finished stages are reused from this folder and the cache "
              "(target samples for evaluation are cached too).", ""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def summary_table(res: PipelineResult) -> str:
    """The compact table the terminal ends with: mean tau per draft and rule, with 95% CIs."""
    lines = []
    for report in res.reports.values():
        temps = report.temperatures
        lines.append("| draft | rule | " + " | ".join(f"T={T:g} mean tau [95% CI]" for T in temps) + " |")
        lines.append("|---|---|" + "---|" * len(temps))
        for lab, _ in report.drafts:
            for rule in report.rules:
                cells = []
                for T in temps:
                    r = report.row(lab, MEAN, T, rule)
                    cells.append(f"{r['tau']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
                lines.append(f"| {lab} | {rule} | " + " | ".join(cells) + " |")
        lines += verdicts(report, [lab for lab, _ in report.drafts if lab != NGRAM and not lab.endswith("+" + NGRAM)])
        lines.append("")
    return "\n".join(lines)


def verdicts(report: Any, names: list[str]) -> list[str]:
    """The loss comparison (every trained draft against the first) and, when it was scored, every draft and
    its n-gram combination against the training-free n-gram lookup."""
    labels = {lab for lab, _ in report.drafts}
    lines: list[str] = []
    for T in report.temperatures:
        for rule in report.rules:
            if T == 0 and rule != report.rules[0]:
                continue  # both rules coincide at T = 0
            lines += verdict(report, T, rule, against=names[0], challengers=set(names[1:]))
    if NGRAM in labels:
        lines += ["", f"Against the n-gram lookup (`{NGRAM}`, no training):", ""]
        combos = {f"{n}+{NGRAM}" for n in names} & labels
        for T in report.temperatures:
            for rule in report.rules:
                if T == 0 and rule != report.rules[0]:
                    continue
                lines += verdict(report, T, rule, against=NGRAM, challengers=set(names) | combos)
    return lines + speed_verdict(report)


def speed_verdict(report: Any) -> list[str]:
    """Per temperature, the proposer the cost model expects to be fastest under `lkspec generate` here (its rule:
    sampled drafts), and by how much over plain decoding; nothing when the eval ran with --no-speed."""
    if not getattr(report, "costs", None) or "sampled" not in report.rules:
        return []
    lines = ["", "Predicted `lkspec generate` speed-up over plain decoding on this machine (cost model, mean over "
             "benchmarks, at the best K):", ""]
    for T in report.temperatures:
        rows = [report.row(lab, MEAN, T, "sampled") for lab, _ in report.drafts]
        best = max(rows, key=lambda r: r["predicted_speedup"]["at_best_k"])
        sp = best["predicted_speedup"]
        lines.append(f"- T={T:g}: `{best['draft']}` {sp['at_best_k']:.2f}x at K = {sp['best_k']} (at K = {sp['k']}: "
                     f"{sp['at_k']:.2f}x)" + ("" if sp["at_best_k"] > 1 else " — slower than plain decoding here"))
    return lines
