"""`lkspec eval`: sample the target once, replay every draft on the same samples, write the report.

Order of work, so that a bad input fails before anything expensive: validate the settings and every
draft (identity, K), render the prompts, then generate (or load) the target samples per benchmark,
temperature and seed, then replay each draft under each rule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from tqdm.auto import tqdm

from lkspec.config import StrictModel, flag, parse
from lkspec.data.benchmarks import BENCHMARKS, canonical_name, load_benchmark
from lkspec.data.prompt_sources import evaluated_overlap
from lkspec.data.source import recorded_parts
from lkspec.drafts import Draft, check_draft_target, load_draft
from lkspec.drafts.checkpoint import CONFIG_FILE
from lkspec.errors import LkspecError
from lkspec.evaluate.replay import (
    RULES,
    TAU_COUNTS,
    PromptReplay,
    check_rule,
    combine,
    draft_traces,
    replay_trace,
)
from lkspec.evaluate.report import Cell, Cost, EvalReport
from lkspec.evaluate.samples import Prompt, SampleSettings, target_samples
from lkspec.export.exporter import source_meta
from lkspec.io import read_json
from lkspec.proposers import NGRAM, NgramSettings
from lkspec.sampling import check_temperature
from lkspec.specdec import SpeculativeGenerator
from lkspec.speed import Costs, measure_pass_costs
from lkspec.targets import Target, load_target

log = logging.getLogger(__name__)


class EvalSettings(StrictModel):
    benchmarks: list[str] = Field(default_factory=lambda: list(BENCHMARKS), description=(
        "Benchmark(s): mtbench, humaneval, gsm8k (offline), gsm8k_full (needs the hub)."),
        **flag("--benchmark", "-b"))
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts of each benchmark.", **flag())
    temperatures: list[float] = Field(default_factory=lambda: [0.0, 1.0], description=(
        "Temperature(s) of target and draft; 0 = greedy."), **flag("--temperature", "-t"))
    rules: list[str] = Field(default_factory=lambda: list(RULES), description=(
        "Acceptance rule(s): 'sampled' (drafts sampled from q, accepted w.p. min(1, p/q)) and/or 'greedy' "
        "(argmax drafts: vLLM's rule)."), **flag("--rule"))
    k: int | None = Field(None, ge=1, description="Tokens drafted per round (K); default: the drafts' head count; "
                          "must be <= it.", **flag("--k", "-k"))
    max_new_tokens: int = Field(256, ge=1, description="Length cap of each target response (tokens).", **flag())
    seeds: list[int] = Field(default_factory=lambda: [0], description=(
        "Seed(s) of the target samples at T > 0; several are pooled per prompt."), **flag("--seed"))
    top_k: int = Field(0, ge=0, description="Top-k filter applied identically to p and q (0 = off).", **flag())
    top_p: float = Field(1.0, gt=0, le=1, description="Top-p filter applied identically to p and q (1 = off).",
                         **flag())
    batch_size: int = Field(16, ge=1, description="Prompts per batch when sampling the target.", **flag())
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples (over prompts) for the 95% CIs.", **flag())
    use_cache: bool = Field(True, description="Reuse target samples cached in $LKSPEC_CACHE/eval-samples (--no-cache "
                            "regenerates them).", **flag("--cache/--no-cache"))
    baseline: bool = Field(True, description="Also score the training-free n-gram prompt lookup (row `ngram`) and "
                           "each draft combined with it (`<draft>+ngram`), paired with every draft.",
                           **flag("--ngram/--no-ngram"))
    speed: bool = Field(True, description=(
        "Also predict `lkspec generate`'s wall-clock speed-up over plain decoding on this machine: time the target's "
        "verification passes and every proposer's round (a few seconds), apply lkspec.speed's cost model to the "
        "measured acceptance."), **flag("--speed/--no-speed"))
    tau_count: str = Field("lkspec", description=(
        "How rounds are counted: 'lkspec' from the last prompt token (the first response token is drafted too); "
        "'vllm' as vLLM's metrics do, after the prefill emitted the first token."), **flag())
    ngram: NgramSettings = Field(default_factory=NgramSettings)

    def checked(self) -> EvalSettings:
        """A normalised copy (canonical benchmark names, sorted unique temperatures); one-line errors otherwise."""
        for t in self.temperatures:
            check_temperature(t)
        if not self.temperatures:
            raise LkspecError("no temperature given; pass --temperature 0 and/or --temperature 1")
        if not self.rules:
            raise LkspecError(f"no acceptance rule given; pass --rule with one of {', '.join(RULES)}")
        rules = list(dict.fromkeys(check_rule(r) for r in self.rules))
        names = [b for b in self.benchmarks if b.strip()]
        if not names:
            raise LkspecError(f"no benchmark selected; pass --benchmark with one of {', '.join(BENCHMARKS)}")
        if not self.seeds:
            raise LkspecError("no seed given; pass --seed 0 (or several)")
        if self.tau_count not in TAU_COUNTS:
            raise LkspecError(f"unknown --tau-count {self.tau_count!r}; choose one of {', '.join(TAU_COUNTS)}")
        return self.model_copy(update={
            "temperatures": sorted(dict.fromkeys(float(t) for t in self.temperatures)),
            "rules": rules,
            "benchmarks": list(dict.fromkeys(canonical_name(b) for b in names)),
            "seeds": list(dict.fromkeys(self.seeds)),
        })


def eval_settings(**kwargs: object) -> EvalSettings:
    """Settings from keyword arguments, validated: unknown keys and bad values are one-line LkspecErrors."""
    return parse(EvalSettings, dict(kwargs), "evaluation settings").checked()


@dataclass
class DraftEntry:
    label: str
    path: str
    draft: Draft


def load_drafts(paths: Sequence[str | Path], target: Target, labels: Sequence[str] | None = None) -> list[DraftEntry]:
    """Load every draft for this target (refusing one made for another) with unique labels."""
    if not paths:
        raise LkspecError("no draft given; pass one or more draft directories (written by `lkspec train`)")
    if labels and len(labels) != len(paths):
        raise LkspecError(f"got {len(labels)} labels for {len(paths)} drafts; pass one --label per draft or none")
    out = []
    for i, p in enumerate(paths):
        draft = load_draft(p, target=target.identity, device=target.device, tables=target.init_tensors).eval()
        label = labels[i] if labels else Path(p).resolve().name
        out.append(DraftEntry(label, str(p), draft))
    seen: dict[str, int] = {}
    for e in out:  # make labels unique (two runs named "run" in different folders)
        if e.label in seen:
            seen[e.label] += 1
            e.label = f"{e.label}#{seen[e.label]}"
        else:
            seen[e.label] = 1
    return out


def resolve_k(drafts: Sequence[DraftEntry], k: int | None) -> int:
    if not drafts:
        if k is None:
            raise LkspecError("the n-gram lookup alone has no head count; pass --k (e.g. --k 6)")
        return k
    heads = min(e.draft.num_heads for e in drafts)
    if k is None:
        return heads
    for e in drafts:  # a recurrent draft (EAGLE-3) drafts any K: the authors evaluate it at 7 after 6 trained steps
        if k > e.draft.num_heads and e.draft.recurrent:
            e.draft = e.draft.with_num_heads(k)
    heads = min(e.draft.num_heads for e in drafts)
    if k > heads:
        worst = min(drafts, key=lambda e: e.draft.num_heads)
        raise LkspecError(f"K = {k} but draft {worst.label!r} has only {worst.draft.num_heads} heads; use --k {heads} "
                          f"or fewer")
    return k


def benchmark_prompts(target: Target, benchmarks: Sequence[str], limit: int | None) -> dict[str, list[Prompt]]:
    out = {}
    for b in benchmarks:
        records = load_benchmark(b, limit=limit)
        if not records:
            raise LkspecError(f"benchmark {b!r} has no prompts; choose another with --benchmark")
        out[b] = [Prompt(b, r.id, target.render_chat(r.messages)) for r in records]
    return out


def check_not_trained_on(entry: DraftEntry, benchmarks: list[str], limit: int | None) -> None:
    """Refuse to score a draft on benchmark prompts its training data came from (`bench:` sources past `skip`,
    as its run or export records them; drafts without that record, e.g. outside checkpoints, are not checked)."""
    d = Path(entry.path)
    try:
        meta, _ = source_meta(d, read_json(d / CONFIG_FILE))
    except (OSError, ValueError):
        return
    for part in recorded_parts(meta.get("data")):
        prompts = part.get("prompts")
        if not isinstance(prompts, dict):
            continue
        skip = int(prompts.get("skip") or 0)
        overlap = evaluated_overlap(str(prompts.get("source", "")), skip, benchmarks, limit)
        if overlap:
            reads = "every prompt" if limit is None else f"the first {limit} prompts"
            raise LkspecError(f"draft {entry.label!r} was trained on {', '.join(overlap)} prompts from prompt {skip} "
                              f"on, and this evaluation reads {reads} of each; pass --limit {skip} or fewer (or "
                              f"other benchmarks) so that tau is measured on prompts it never saw")


def evaluate(target: Target, drafts: Sequence[DraftEntry], settings: EvalSettings, *,
             progress: bool = True, prompts: dict[str, list[Prompt]] | None = None) -> EvalReport:
    """Exact tau of every draft on shared target samples (see lkspec.evaluate.replay)."""
    s = settings.checked()
    if not drafts and not s.baseline:
        raise LkspecError("no draft given; pass one or more draft directories (or keep --ngram to score the n-gram "
                          "lookup alone)")
    for e in drafts:
        check_draft_target(e.draft.config, target.identity, what=f"draft {e.label!r}")
    K = resolve_k(drafts, s.k)
    if prompts is None:
        for e in drafts:
            check_not_trained_on(e, s.benchmarks, s.limit)
    prompts = prompts if prompts is not None else benchmark_prompts(target, s.benchmarks, s.limit)
    benchmarks = list(prompts)
    models = [e.draft for e in drafts]
    rows = [(e.label, e.path) for e in drafts]
    if s.baseline:  # the combinations sit next to their drafts' rows; the n-gram lookup alone comes last
        rows += [(f"{e.label}+{NGRAM}", f"{e.path}+{NGRAM}") for e in drafts] + [(NGRAM, NGRAM)]
    labels = [lab for lab, _ in rows]
    cost = Cost(draft_s=dict.fromkeys(labels, 0.0))
    maps = {e.label: e.draft.token_map.cpu() for e in drafts if e.draft.token_map is not None}
    covered = dict.fromkeys(maps, 0)  # response tokens inside each truncated draft's map (an acceptance ceiling)
    seen = 0
    per_prompt: dict[tuple[str, float, str, str], dict[str, PromptReplay]] = {}
    for T in s.temperatures:
        seeds: list[int | None] = list(s.seeds) if T > 0 else [None]
        for seed in seeds:
            for bench in benchmarks:
                sset = SampleSettings(temperature=T, top_k=s.top_k, top_p=s.top_p, seed=seed,
                                      max_new_tokens=s.max_new_tokens)
                run = target_samples(target, prompts[bench], sset, batch_size=s.batch_size, use_cache=s.use_cache,
                                     progress=progress, desc=f"sampling {bench} T={T:g}")
                cost.generation_s += run.seconds
                cost.generated_tokens += run.generated_tokens
                cost.generated_samples += run.generated
                cost.cached_samples += len(run.samples) - run.generated
                bar = tqdm(run.samples, desc=f"replay {bench} T={T:g}", unit="prompt", disable=not progress,
                           leave=False)
                tokens, t0 = 0, time.perf_counter()
                for sample in bar:
                    st = draft_traces(models, target, sample, temperature=T, top_k=s.top_k, top_p=s.top_p,
                                      num_heads=K, ngram=s.ngram if s.baseline else None)
                    cost.target_head_s += st.p_seconds
                    traces = list(st.drafts)
                    if st.ngram is not None:
                        traces += [combine(st.ngram, tr, st.ngram_lengths) for tr in st.drafts] + [st.ngram]
                    for lab, tr in zip(labels, traces, strict=True):
                        t1 = time.perf_counter()
                        for rule in s.rules:
                            c = replay_trace(tr, rule, T, K, s.tau_count)
                            acc = per_prompt.setdefault((lab, T, rule, bench), {})
                            acc[sample.id] = acc[sample.id] + c if sample.id in acc else c
                        cost.draft_s[lab] += tr.seconds + time.perf_counter() - t1
                    tokens += sample.n
                    seen += sample.n
                    for lab, tm in maps.items():
                        covered[lab] += int(torch.isin(sample.response, tm).sum())
                    bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
                bar.close()
    cells = {key: Cell(list(v.values())) for key, v in per_prompt.items()}
    costs = round_costs(target, drafts, s, K) if s.speed else {}
    return EvalReport(
        target=target.identity.model_dump(), drafts=rows, benchmarks=benchmarks,
        temperatures=list(s.temperatures), rules=list(s.rules), k=K, max_new_tokens=s.max_new_tokens,
        seeds=list(s.seeds), cells=cells, cost=cost, bootstrap=s.bootstrap,
        coverage={lab: n / max(seen, 1) for lab, n in covered.items()}, costs=costs, tau_count=s.tau_count,
    )


def round_costs(target: Target, drafts: Sequence[DraftEntry], s: EvalSettings,
                K: int) -> dict[tuple[str, float], Costs]:
    """(label, T) -> this machine's round costs for every scored proposer: one target pass timing shared by all,
    each proposer's own proposal and acceptance step (SpeculativeGenerator.measure_costs)."""
    log.info("timing the target's verification passes and each proposer's round for the predicted speed-up "
             "(--no-speed skips this)")
    passes = measure_pass_costs(target, K + 1)
    kinds: list[tuple[str, Draft | None, str]] = [(e.label, e.draft, "draft") for e in drafts]
    if s.baseline:
        kinds += [(f"{e.label}+{NGRAM}", e.draft, "ngram+draft") for e in drafts] + [(NGRAM, None, NGRAM)]
    return {(lab, T): SpeculativeGenerator(target, d, k=K, temperature=T, top_k=s.top_k, top_p=s.top_p,
                                           proposer=kind, ngram=s.ngram).measure_costs(passes)
            for T in s.temperatures for lab, d, kind in kinds}


def run_eval(target_spec: str, draft_paths: Sequence[str | Path], settings: EvalSettings, *,
             labels: Sequence[str] | None = None, out: str | Path = "results.json", table: str | Path | None = None,
             plot: str | Path | None = None, device: str | None = None, progress: bool = True) -> EvalReport:
    """Everything `lkspec eval` does: load, evaluate, write JSON + markdown + PNG (atomically)."""
    out = Path(out)
    if out.suffix != ".json":
        raise LkspecError(f"--out must name a .json file, got {out}")
    target = load_target(target_spec, device=device)
    drafts = load_drafts(draft_paths, target, labels)
    report = evaluate(target, drafts, settings, progress=progress)
    report.write_json(out)
    report.write_markdown(Path(table) if table else out.with_suffix(".md"))
    report.plot(Path(plot) if plot else out.with_suffix(".png"))
    return report
