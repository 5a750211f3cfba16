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
from lkspec.data.prompts import PromptConfig, load_prompts, write_prompts_jsonl
from lkspec.data.regenerate import RegenConfig, regenerate
from lkspec.drafts import DRAFTS, load_draft
from lkspec.errors import LkspecError, NoServedLayoutError
from lkspec.evaluate.run import DraftEntry, EvalSettings, evaluate
from lkspec.export.exporter import export_draft
from lkspec.io import read_json, write_json
from lkspec.losses import BASELINE_LOSS, DEFAULT_LOSS, LOSSES, check_loss_name, get_loss
from lkspec.targets import load_target
from lkspec.train import build_config, train
from lkspec.train.checkpoint import state_dir
from lkspec.train.setup import draft_aux_layers

log = logging.getLogger(__name__)

RECORD = "pipeline.json"
RECORD_FORMAT = "lkspec-pipeline/1"
# everything run_pipeline and write_report put in an output folder: all that --fresh may delete
OUTPUTS = ("data", "runs", "eval", "export", "report.md", "metrics.png", RECORD)


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


class ExportOptions(StrictModel):
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
        for arch in self.archs:  # every run's training config must parse now, not hours later
            for loss in self.losses:
                self.train_config(arch, loss, Path("."))
        self.eval.checked()
        return self

    def run_names(self) -> list[tuple[str, str, str]]:
        """(name, arch, loss) of every training run, baseline loss first within each arch."""
        return [(f"{DRAFTS[a].short}-{loss}", a, loss) for a in self.archs for loss in self.losses]

    def aux_layers(self, target: Any, out: Path) -> list[int]:
        """The aux layers the features must carry: those the runs' drafts read (EAGLE-3), one set for all."""
        sets = {tuple(draft_aux_layers(self.train_config(arch, loss, out).draft, target.identity, target.config))
                for _, arch, loss in self.run_names()} - {()}
        if len(sets) > 1:
            raise LkspecError(f"the drafts read different target layers {sorted(sets)}; give every eagle3 run the "
                              f"same draft.aux_layers (the features are extracted once)")
        return list(next(iter(sets), ()))

    def train_config(self, arch: str, loss: str, out: Path) -> Any:
        overrides = {
            **flatten(self.train),
            **flatten(self.arch_train.get(arch, {})),
            "target": self.target,
            "features": str(out / "data" / "features"),
            "draft.arch": arch,
            **{f"draft.{k}": v for k, v in self.arch_options.get(arch, {}).items()},
            "loss.name": loss,
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
    results: dict[str, Path] = field(default_factory=dict)  # run name -> its results JSON
    times: list[StageTime] = field(default_factory=list)
    draft_params: dict[str, int] = field(default_factory=dict)
    data_stats: dict[str, Any] = field(default_factory=dict)
    not_exported: dict[str, str] = field(default_factory=dict)  # run name -> why its layout cannot hold it


def _check_record(out: Path, cfg: PipelineConfig) -> None:
    """One output directory holds one config's results; a different config must not mix into it."""
    rec = out / RECORD
    now = cfg.model_dump(mode="json")
    if rec.is_file():
        old = read_json(rec).get("config")
        if old is not None and old != now:
            keys = [line.split(":", 1)[0] for line in changed_keys(old, now)]
            shown = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
            raise LkspecError(f"{out} holds results of different settings ({shown}); choose another output folder "
                              f"(--out) or pass --fresh to start over there")
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
    runs = cfg.run_names()
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

    for i, (name, arch, loss) in enumerate(runs):
        tcfg = cfg.train_config(arch, loss, out).model_copy(update={"progress": progress})
        run_dir = out / "runs" / name
        t = stage(3 + i, f"train {name}: {arch}, loss {loss}"
                  + (f" (eta {tcfg.eta:g})" if get_loss(loss).uses_eta else ""))
        resume = state_dir(run_dir) is not None
        result = train(tcfg, run_dir, store=store, target=target, resume=resume)
        res.runs[name] = run_dir
        if result.draft is not None:
            res.draft_params[name] = result.draft.num_parameters()
        res.times.append(StageTime(f"train {name}", time.perf_counter() - t,
                                   f"{result.step} steps, best held-out simulated tau "
                                   f"{result.best_tau:.3f}" if result.best_tau is not None else ""))

    t = stage(n_stages - 1, "evaluate: exact tau by coupling replay (target samples shared by all drafts)")
    groups: dict[str, list[DraftEntry]] = {}
    for name, arch, _ in runs:  # paired comparison within an architecture: baseline loss first
        draft = load_draft(res.runs[name], target=target.identity, device=target.device,
                           tables=target.init_tensors).eval()
        groups.setdefault(DRAFTS[arch].short, []).append(DraftEntry(name, str(res.runs[name]), draft))
    for short, group in groups.items():
        report = evaluate(target, group, cfg.eval, progress=progress)
        stem = out / "eval" / short
        report.write_json(stem.with_suffix(".json"))
        report.write_markdown(stem.with_suffix(".md"))
        report.plot(stem.with_suffix(".png"))
        res.reports[short] = report
        for e in group:
            res.results[e.label] = stem.with_suffix(".json")
    cost = [r.cost for r in res.reports.values()]
    res.times.append(StageTime("evaluate", time.perf_counter() - t,
                               f"{sum(c.generated_samples for c in cost)} target samples generated, "
                               f"{sum(c.cached_samples for c in cost)} from the cache"))

    t = stage(n_stages, f"export ({cfg.export.format} layout, {cfg.export.dtype}) with model cards")
    for name, run_dir in res.runs.items():
        dst = out / "export" / name
        try:
            export_draft(run_dir, dst, dtype=cfg.export.dtype, fmt=cfg.export.format,
                         base_model=cfg.export.base_model, eval_results=res.results[name], eval_draft=name,
                         overwrite=True)
        except NoServedLayoutError as exc:  # e.g. a token-map MEDUSA: the draft stays usable with lkspec generate
            log.warning("not exported: %s", exc)
            res.not_exported[name] = str(exc)
            continue
        res.exports[name] = dst
    res.times.append(StageTime("export", time.perf_counter() - t, f"{len(res.exports)} drafts"))
    return res


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
