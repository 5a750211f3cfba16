"""The whole job in one config: prompts -> regenerate -> features -> train (one run per loss) -> eval -> export.

`lkspec demo` is this pipeline with a built-in config for the embedded target; `lkspec run CONFIG` runs a
shipped recipe (configs/llama31-8b-*.yaml is the paper's). Every stage already resumes or skips finished
work, so a rerun only re-does what changed; the pipeline itself is wiring plus one record
(`pipeline.json`) that refuses to mix outputs of two different configs in one directory.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from lkspec.config import StrictModel, changed_keys, flatten, layered, parse
from lkspec.data.combined import CombinedSource
from lkspec.data.features import FeatureOptions, FeatureStore, OnlineFeatures
from lkspec.data.pipeline import run_all
from lkspec.data.prompt_sources import check_disjoint
from lkspec.data.prompts import PromptConfig, load_prompts, write_prompts_jsonl
from lkspec.data.regenerate import RegenConfig, regenerate
from lkspec.drafts import DRAFTS, load_draft
from lkspec.errors import LkspecError, NoServedLayoutError
from lkspec.evaluate.run import DraftEntry, EvalSettings, evaluate
from lkspec.evaluate.seeds import SeedTable, seed_table
from lkspec.evaluate.stored import eval_inputs, load_report, save_report, weight_digests
from lkspec.export.exporter import export_draft, is_export
from lkspec.io import read_json, sha256_file, write_json, write_text
from lkspec.losses import BASELINE_LOSS, DEFAULT_LOSS, LOSSES, check_loss_name, get_loss
from lkspec.targets import load_target
from lkspec.train import build_config, train
from lkspec.train.checkpoint import state_dir
from lkspec.train.config import CONFIG_YAML
from lkspec.train.setup import draft_aux_layers

log = logging.getLogger(__name__)

RECORD = "pipeline.json"
RECORD_FORMAT = "lkspec-pipeline/1"
EXPORT_STAMPS = "exported-from.json"
# everything run_pipeline and write_report put in an output folder: all that --fresh may delete
OUTPUTS = ("data", "starts", "runs", "eval", "export", "report.md", "metrics.png", RECORD)


class DataPart(StrictModel):
    """More training documents: other prompts, and/or the target answering at another temperature."""

    prompts: PromptConfig = Field(default_factory=PromptConfig)
    regenerate: RegenConfig = Field(default_factory=RegenConfig)


class DataSection(StrictModel):
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    regenerate: RegenConfig = Field(default_factory=RegenConfig)
    features: FeatureOptions = Field(default_factory=FeatureOptions)
    extra: list[DataPart] = Field(default_factory=list, description=(
        "further prompt sets / sampling settings (each in data/extra-N); training reads all parts as one set"))

    def parts(self) -> list[tuple[str, PromptConfig, RegenConfig]]:
        """(folder under data/, prompts, regeneration) of every part, the main one first."""
        return [("", self.prompts, self.regenerate),
                *((f"extra-{i}", p.prompts, p.regenerate) for i, p in enumerate(self.extra, 1))]


class Variant(StrictModel):
    """More runs of some losses with other training settings (e.g. the serving temperature), named -<variant>."""

    losses: list[str] = Field(default_factory=list, description="the losses run this way (empty: all of them)")
    train: dict[str, Any] = Field(default_factory=dict, description="training settings over `train`, e.g. "
                                                                    "{loss: {temperature: 0.7}}")


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name (runs/<name>) and what distinguishes it."""

    name: str
    arch: str
    loss: str
    seed: int | None = None  # None: train.seed
    variant: str | None = None


class ExportOptions(StrictModel):
    enabled: bool = Field(True, description="export every run (a many-seed study may skip it)")
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    format: Literal["vllm", "arctic"] = "vllm"
    base_model: str | None = Field(None, description="hub id written into the card (default: the target's)")


class PipelineConfig(StrictModel):
    """One file for the whole chain. `train` is a `lkspec train` config without target/features (set here)."""

    name: str = "lkspec"
    target: str = "smollm2-135m-instruct"
    device: str | None = None
    archs: list[str] = Field(default_factory=lambda: ["mlp_speculator"], description="draft architectures "
                             "(the registry lkspec.drafts.DRAFTS)")
    losses: list[str] = Field(default_factory=lambda: [BASELINE_LOSS, DEFAULT_LOSS],
                              description="one training run per (arch, loss); the first loss is the baseline")
    arch_options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                    description="per-arch draft options, e.g. mlp_speculator: "
                                                                "{inner_dim: 256}")
    arch_train: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                  description="per-arch training settings over `train`, e.g. eagle3: "
                                                              "{optim: {lr: 1.0e-3}}")
    seeds: list[int] = Field(default_factory=list, description="one run per seed (names end -s<seed>), each loss "
                             "paired with the baseline of the same seed; empty: train.seed once")
    variants: dict[str, Variant] = Field(default_factory=dict, description="further runs with other training "
                                         "settings, e.g. t07: {losses: [kl], train: {loss: {temperature: 0.7}}}")
    data: DataSection = Field(default_factory=DataSection)
    train: dict[str, Any] = Field(default_factory=dict)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    export: ExportOptions = Field(default_factory=ExportOptions)

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if not self.archs:
            raise ValueError(f"archs is empty; list one or more of {', '.join(DRAFTS)}")
        if not self.losses:
            raise ValueError("losses is empty; list at least one of " + ", ".join(LOSSES))
        for loss in self.losses:
            check_loss_name(loss)
        for key in ("target", "features"):
            if key in self.train:
                raise ValueError(f"train.{key} is set by the pipeline; remove it (use the top-level target)")
        for arch in [*self.arch_options, *self.arch_train]:
            if arch not in DRAFTS:
                raise ValueError(f"arch_options / arch_train name an unknown architecture {arch!r}; choose from "
                                 f"{', '.join(DRAFTS)}")
        for arch in self.archs:
            if arch not in DRAFTS:
                raise ValueError(f"unknown architecture {arch!r} in archs; choose from {', '.join(DRAFTS)}")
        for name, v in self.variants.items():
            if not name.replace("_", "").isalnum():
                raise ValueError(f"variant name {name!r} goes into run names: use letters, digits and _")
            for loss in v.losses:
                if loss not in self.losses:
                    raise ValueError(f"variant {name!r} names loss {loss!r}, which is not in losses")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat a seed: {self.seeds}")
        for spec in self.runs():  # every run's training config must parse now, not hours later
            self.train_config(spec, Path("."))
        self.eval.checked()
        for i, (_, prompts, _) in enumerate(self.data.parts()):
            check_disjoint(prompts, self.eval.benchmarks, self.eval.limit,
                           "data.prompts" if i == 0 else f"data.extra[{i - 1}].prompts")
        return self

    def runs(self) -> list[RunSpec]:
        """Every training run: per arch, each variant's losses (baseline first) for each seed."""
        out = []
        seeds: list[int | None] = list(self.seeds) or [None]
        for a in self.archs:
            for variant in [None, *self.variants]:
                losses = self.losses if variant is None else (self.variants[variant].losses or self.losses)
                for loss in losses:
                    for seed in seeds:
                        name = (f"{DRAFTS[a].short}-{loss}" + (f"-{variant}" if variant else "")
                                + (f"-s{seed}" if seed is not None else ""))
                        out.append(RunSpec(name, a, loss, seed, variant))
        return out

    def run(self, name: str) -> RunSpec:
        return next(r for r in self.runs() if r.name == name)

    def aux_layers(self, target: Any, out: Path) -> list[int]:
        """The aux layers the features must carry: those the runs' drafts read (EAGLE-3), one set for all."""
        sets = {tuple(draft_aux_layers(self.train_config(spec, out).draft, target.identity, target.config))
                for spec in self.runs()} - {()}
        if len(sets) > 1:
            raise LkspecError(f"the drafts read different target layers {sorted(sets)}; give every eagle3 run the "
                              f"same draft.aux_layers (the features are extracted once)")
        return list(next(iter(sets), ()))

    def train_config(self, spec: RunSpec, out: Path) -> Any:
        overrides = {
            "start_cache": str(out / "starts"),  # every run of one arch and seed starts from one fit
            **flatten(self.train),
            **flatten(self.arch_train.get(spec.arch, {})),
            **(flatten(self.variants[spec.variant].train) if spec.variant else {}),
            **({"seed": spec.seed} if spec.seed is not None else {}),
            "target": self.target,
            "features": str(out / "data" / "features"),
            "draft.arch": spec.arch,
            **{f"draft.{k}": v for k, v in self.arch_options.get(spec.arch, {}).items()},
            "loss.name": spec.loss,
        }
        return build_config(None, overrides)


def load_pipeline_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                         base: dict[str, Any] | None = None) -> PipelineConfig:
    """base < YAML file < dotted overrides (`--set train.epochs=2`); unknown keys are one-line errors."""
    data = layered(path, overrides, base)
    return parse(PipelineConfig, data, f"pipeline config{f' {path}' if path else ''}")


@dataclass
class StageTime:
    name: str
    seconds: float
    note: str = ""


@dataclass
class PipelineResult:
    out: Path
    config: PipelineConfig
    runs: dict[str, Path] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)
    reports: dict[str, Any] = field(default_factory=dict)  # arch short name -> lkspec.evaluate.EvalReport
    seed_tables: dict[str, SeedTable] = field(default_factory=dict)  # arch short name -> losses pooled over seeds
    results: dict[str, Path] = field(default_factory=dict)  # run name -> its results JSON
    times: list[StageTime] = field(default_factory=list)
    draft_params: dict[str, int] = field(default_factory=dict)
    data_stats: dict[str, Any] = field(default_factory=dict)
    not_exported: dict[str, str] = field(default_factory=dict)  # run name -> why its layout cannot hold it


# Keys that only choose which runs exist, or settings each stage checks against what it kept: a run refuses to
# resume under other training settings (train.setup), an evaluation replays again when its inputs changed
# (lkspec.evaluate.stored), an export is redone when its stamp differs. So a study can grow (another
# architecture, loss or seed) in its own folder; data, target and the shared train section cannot change there.
RESELECTABLE = ("name", "archs", "losses", "seeds", "variants", "arch_options", "arch_train", "eval", "export")


def _check_record(out: Path, cfg: PipelineConfig) -> None:
    """One output directory holds one config's results; a different config must not mix into it."""
    rec = out / RECORD
    now = cfg.model_dump(mode="json")
    if rec.is_file():
        old = read_json(rec).get("config")
        if old is not None and old != now:
            keys = [line.split(":", 1)[0] for line in changed_keys(old, now, ignore=RESELECTABLE)]
            if keys:
                shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
                raise LkspecError(f"{out} holds results of different settings ({shown}); choose another output "
                                  f"folder (--out) or pass --fresh to start over there")
            sections = sorted({line.split(":", 1)[0].split(".")[0] for line in changed_keys(old, now)})
            log.info("%s: %s changed; finished runs are kept, new ones added", out, ", ".join(sections))
            write_json(rec, {"format": RECORD_FORMAT, "config": now})
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(rec, {"format": RECORD_FORMAT, "config": now})


def clear_outputs(out: Path) -> list[str]:
    """--fresh: delete what a pipeline wrote in `out` (OUTPUTS) and nothing else; returns the names kept."""
    try:
        record = read_json(out / RECORD)
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise LkspecError(f"--fresh would delete {out}, which is not an lkspec output folder (no {RECORD} written "
                          f"by lkspec); choose another --out")
    for name in OUTPUTS:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
    kept = sorted(p.name for p in out.iterdir())
    if kept:
        log.info("--fresh kept what lkspec did not write in %s: %s", out, ", ".join(kept[:5]))
    return kept


def run_pipeline(cfg: PipelineConfig, out: str | Path, *, progress: bool = True,
                 announce: Callable[[str], None] = print) -> PipelineResult:
    """Run (or finish) every stage into `out`; returns paths, the evaluation report and stage timings."""
    out = Path(out)
    _check_record(out, cfg)
    res = PipelineResult(out=out, config=cfg)
    runs = cfg.runs()
    n_stages = 4 + len(runs)

    def stage(i: int, text: str) -> float:
        announce(f"[{i}/{n_stages}] {text}")
        return time.perf_counter()

    t = stage(1, f"target {cfg.target}")
    target = load_target(cfg.target, device=cfg.device)
    res.times.append(StageTime("load target", time.perf_counter() - t))

    t = stage(2, "data: prompts -> target-regenerated responses -> hidden-state features")
    f = cfg.data.features
    feature_kw = {**f.extract_kwargs(), "aux_layers": f.aux_layers or cfg.aux_layers(target, out)}
    sources: list[Any] = []
    for folder, prompts, regen in cfg.data.parts():
        where = out / "data" / folder if folder else out / "data"
        if f.online:
            ps = load_prompts(prompts)
            write_prompts_jsonl(ps, where / "prompts.jsonl")
            regenerate(target, ps, where / "tokens", regen, progress=progress)
            sources.append(OnlineFeatures(target, where / "tokens", **feature_kw))
        else:
            paths = run_all(lambda _stage: target, prompts, regen, where, progress=progress, **feature_kw)
            sources.append(FeatureStore(paths["features"]))
    store: Any = sources[0] if len(sources) == 1 else CombinedSource(sources)
    res.data_stats = {"docs": store.num_docs, "tokens": store.num_tokens, "loss_tokens": store.num_loss_tokens}
    res.times.append(StageTime("data", time.perf_counter() - t,
                               f"{store.num_docs} responses, {store.num_tokens:,} tokens"))

    for i, spec in enumerate(runs):
        name, arch, loss = spec.name, spec.arch, spec.loss
        tcfg = cfg.train_config(spec, out).model_copy(update={"progress": progress})
        run_dir = out / "runs" / name
        t = stage(3 + i, f"train {name}: {arch}, loss {loss}"
                  + (f" (eta {tcfg.eta:g})" if get_loss(loss).uses_eta else "")
                  + (f", seed {tcfg.seed}" if spec.seed is not None else ""))
        # a run killed before its first checkpoint left only its config and step-0 draft: resume starts it over
        resume = state_dir(run_dir) is not None or (run_dir / CONFIG_YAML).is_file()
        result = train(tcfg, run_dir, store=store, target=target, resume=resume)
        res.runs[name] = run_dir
        if result.draft is not None:
            res.draft_params[name] = result.draft.num_parameters()
        res.times.append(StageTime(f"train {name}", time.perf_counter() - t,
                                   f"{result.step} steps, best held-out simulated tau "
                                   f"{result.best_tau:.3f}" if result.best_tau is not None else ""))

    t = stage(n_stages - 1, "evaluate: exact tau by coupling replay (target samples shared by all drafts)")
    groups: dict[str, list[DraftEntry]] = {}
    digests = {name: weight_digests(run_dir) for name, run_dir in res.runs.items()}  # read by eval and export
    for name, arch in ((r.name, r.arch) for r in runs):  # paired within an architecture: baseline first
        draft = load_draft(res.runs[name], target=target.identity, device=target.device,
                           tables=target.init_tensors).eval()
        groups.setdefault(DRAFTS[arch].short, []).append(DraftEntry(name, str(res.runs[name]), draft))
    for short, group in groups.items():
        stem = out / "eval" / short
        kept = stem.with_suffix(".state.json")  # a rerun with the same drafts and settings replays nothing
        inputs = eval_inputs(cfg.eval, target.identity.model_dump(mode="json"),
                             [(e.label, e.path, digests[e.label]) for e in group])
        report = load_report(kept, inputs)
        if report is None:
            report = evaluate(target, group, cfg.eval, progress=progress)
            save_report(kept, report, inputs)
        report.write_json(stem.with_suffix(".json"))
        report.write_markdown(stem.with_suffix(".md"))
        report.plot(stem.with_suffix(".png"))
        res.reports[short] = report
        if cfg.seeds or cfg.variants:  # losses pooled over seeds, paired by seed (lkspec.evaluate.seeds)
            table = seed_table(report, [r for r in runs if DRAFTS[r.arch].short == short])
            write_json(out / "eval" / f"{short}-seeds.json", table.to_json())
            write_text(out / "eval" / f"{short}-seeds.md", table.markdown() + "\n")
            res.seed_tables[short] = table
        for e in group:
            res.results[e.label] = stem.with_suffix(".json")
    cost = [r.cost for r in res.reports.values()]
    res.times.append(StageTime("evaluate", time.perf_counter() - t,
                               f"{sum(c.generated_samples for c in cost)} target samples generated, "
                               f"{sum(c.cached_samples for c in cost)} from the cache"))

    if not cfg.export.enabled:
        stage(n_stages, "export: skipped (export.enabled: false)")
        return res
    t = stage(n_stages, f"export ({cfg.export.format} layout, {cfg.export.dtype}) with model cards")
    stamps_file = out / "export" / EXPORT_STAMPS  # what each export was made from: a rerun rewrites only changes
    stamps = read_json(stamps_file) if stamps_file.is_file() else {}
    for name, run_dir in res.runs.items():
        dst = out / "export" / name
        made_from = {"weights": digests[name],
                     "results": sha256_file(res.results[name]), "options": cfg.export.model_dump(mode="json")}
        if stamps.get(name) == made_from and is_export(dst):
            res.exports[name] = dst
            continue
        try:
            export_draft(run_dir, dst, dtype=cfg.export.dtype, fmt=cfg.export.format,
                         base_model=cfg.export.base_model, eval_results=res.results[name], eval_draft=name,
                         overwrite=True)
        except NoServedLayoutError as exc:  # e.g. a token-map MEDUSA: the draft stays usable with lkspec generate
            log.warning("not exported: %s", exc)
            res.not_exported[name] = str(exc)
            continue
        res.exports[name] = dst
        stamps[name] = made_from
        write_json(stamps_file, stamps)
    res.times.append(StageTime("export", time.perf_counter() - t, f"{len(res.exports)} drafts"))
    return res


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
