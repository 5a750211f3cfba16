"""Everything a training run needs before its first step, built in one place and in a fixed order.

The order is the order of failure a user should see: the run directory's state (new, resume, or a
clash), the data, the teacher, then the draft and the optimisation machinery. `Setup` is plain data;
`train/loop.py` only reads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from lkspec.data.features import Doc, FeatureStore
from lkspec.data.source import data_identity, same_documents
from lkspec.drafts import DRAFTS, Draft, build_draft, load_draft
from lkspec.errors import LkspecError
from lkspec.io import read_json
from lkspec.targets import TargetIdentity, TargetTensors, load_lm_head
from lkspec.train.batching import DataPlan, DocSource, plan_data, survey
from lkspec.train.checkpoint import state_dir
from lkspec.train.config import CONFIG_YAML, RESUMABLE_KEYS, DraftOptions, TrainConfig, changed_keys, config_dict
from lkspec.train.distributed import DistContext, shard_draft
from lkspec.train.starts import keep_start, load_start, start_key
from lkspec.train.step import StepRunner, Teacher, head_modules
from lkspec.train.vocab import choose_vocab, read_token_list

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"


class TeacherHead(Teacher, Protocol):
    """A target as training sees it (`Target` or the lighter `targets.LMHead`)."""

    config: Any  # the target's HF config (an architecture may take its shapes from it)

    @property
    def identity(self) -> TargetIdentity: ...

    def init_tensors(self) -> TargetTensors: ...


@dataclass
class Setup:
    cfg: TrainConfig  # resolved (architecture defaults filled in)
    ctx: DistContext
    resume: bool  # a checkpoint exists and the run continues from it
    store: DocSource
    teacher: TeacherHead
    plan: DataPlan
    draft: Draft  # on the training device (sharded under fsdp)
    export_draft: Draft  # CPU copy that full state dicts are saved from
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    runner: StepRunner
    fsdp: bool
    notes: dict[str, Any]  # how the draft started (vocabulary coverage, init fit): recorded with the run

    @property
    def identity(self) -> TargetIdentity:
        return self.teacher.identity

    @property
    def total_steps(self) -> int:
        return self.plan.steps_per_epoch * self.cfg.epochs


def check_run_dir(run: Path, cfg: TrainConfig, resume: bool, init_from: str | Path | None) -> bool:
    """Whether there is a checkpoint to continue from (else this is a new run); one-line errors on clashes."""
    if resume and init_from is not None:
        raise LkspecError("--resume continues a run and --init-from starts a new one; pass only one of them")
    if resume:
        d = state_dir(run)
        if d is None:
            if (run / CONFIG_YAML).is_file():  # killed before its first checkpoint: start it over
                log.info("%s has no checkpoint yet; starting it from step 0", run)
                return False
            raise LkspecError(f"{run} has no trainer_state/ to resume from; start a new run without --resume")
        state = read_json(d / "state.json")
        # a run that recorded its data's identity is checked by content (check_same_data), not by the spelling
        # of its features path, which may be relative to another directory
        ignore = (*RESUMABLE_KEYS, "features") if "data" in state else RESUMABLE_KEYS
        diffs = changed_keys(state["config"], config_dict(cfg), ignore)
        if diffs:
            raise LkspecError(
                f"{run} was started with a different config ({'; '.join(diffs)}); resume with the original "
                f"settings (in {run}/{CONFIG_YAML}) or start a new run directory"
            )
        return True
    if state_dir(run) is not None or (run / "config.json").exists():
        raise LkspecError(f"{run} already holds a training run; pass --resume to continue it or choose a new "
                          f"output directory")
    return False


def check_same_data(run: Path, store: DocSource) -> None:
    """A resumed run must read the very documents it started on, wherever the command is run from."""
    d = state_dir(run)
    recorded = read_json(d / "state.json").get("data") if d is not None else None
    if recorded is None:  # checkpoints older than the identity record
        return
    now = data_identity(store)
    if not same_documents(store, recorded["fingerprint"]):
        where = "" if now["path"] == recorded["path"] else f" ({store.path} is {now['path']})"
        raise LkspecError(
            f"{run} was trained on the documents in {recorded['path']}, but the features given{where} hold "
            f"different ones; resume with --features {recorded['path']} or start a new run directory"
        )


def open_store(cfg: TrainConfig) -> DocSource:
    if not cfg.features:
        raise LkspecError("no training features given; pass --features DIR (made by `lkspec data features`)")
    return FeatureStore(cfg.features)


def open_teacher(cfg: TrainConfig, store: DocSource, device: torch.device) -> TeacherHead:
    spec = cfg.target or store.identity.name
    try:
        return load_lm_head(spec, device=device)
    except LkspecError as exc:
        if cfg.target:
            raise
        raise LkspecError(
            f"the features were made for target {spec!r}, which cannot be opened by that name ({exc}); "
            f"pass --target (its hub id, directory or .gguf)"
        ) from None


def draft_vocab_size(cfg: TrainConfig, identity: TargetIdentity) -> int | None:
    """N of a truncated draft vocabulary (from draft.vocab_size, else the token file's length), or None."""
    d = cfg.draft
    if d.vocab_tokens is not None:
        n = read_token_list(d.vocab_tokens, identity.vocab_size).numel()
        if d.vocab_size is not None and d.vocab_size != n:
            raise LkspecError(f"draft.vocab_tokens {d.vocab_tokens} holds {n} ids but draft.vocab_size is "
                              f"{d.vocab_size}; drop draft.vocab_size or make them agree")
        return n
    if d.vocab_size is not None and d.vocab_size > identity.vocab_size:
        raise LkspecError(f"draft.vocab_size {d.vocab_size} exceeds the target's {identity.vocab_size} tokens; "
                          f"use a smaller value or leave it unset (full vocabulary)")
    return d.vocab_size


def arch_options(d: DraftOptions, identity: TargetIdentity, target_config: Any = None,
                 vocab: int | None = None) -> dict[str, Any]:
    """The draft's config options: what the user set, over what the architecture takes from the target's config
    (EAGLE-3's layer shapes and aux layers), over the architecture's defaults."""
    base = DRAFTS[d.arch].target_config_defaults(target_config) if target_config is not None else {}
    return {**base, **d.options(vocab, identity.hidden_size)}


def draft_aux_layers(d: DraftOptions, identity: TargetIdentity, target_config: Any) -> list[int]:
    """The target layers a run's draft reads besides the final state (features must carry them)."""
    return list(arch_options(d, identity, target_config).get("aux_layers") or [])


def new_draft(cfg: TrainConfig, identity: TargetIdentity, init_from: str | Path | None = None,
              vocab: int | None = None, target_config: Any = None,
              tables: Callable[[], TargetTensors] | None = None) -> Draft:
    """The run's draft: seeded random init, or the weights of `init_from` (same options required)."""
    d = cfg.draft
    draft = build_draft(d.arch, seed=cfg.seed, hidden_size=identity.hidden_size, vocab_size=identity.vocab_size,
                        **arch_options(d, identity, target_config, vocab))
    if init_from is not None:
        src = load_draft(init_from, target=identity, tables=tables)
        if src.config != draft.config:
            have = src.config.model_dump(exclude={"hidden_size", "vocab_size"})
            raise LkspecError(
                f"--init-from {init_from} holds a draft with {have}, which differs from this run's draft "
                f"options; set draft.* to match it"
            )
        draft.load_state_dict(src.state_dict())
    return draft


def start_from_data(draft: Draft, cfg: TrainConfig, store: DocSource, plan: DataPlan,
                    teacher: TeacherHead) -> dict[str, Any]:
    """Choose the token map and fit a target initialisation on the training split (a new run only)."""
    def train_docs() -> Iterator[Doc]:
        return (doc for doc in store.iter_docs(seed=None) if doc.row in plan.train_rows)

    notes: dict[str, Any] = {"init": cfg.draft.init}
    V = teacher.identity.vocab_size
    draft.adopt_target(teacher.init_tensors)
    if draft.token_map is not None:
        choice = choose_vocab(train_docs(), size=draft.config.head_rows, vocab_size=V, rank=cfg.draft.vocab_rank,
                              teacher=teacher, tokens_file=cfg.draft.vocab_tokens)
        draft.set_token_map(choice.tokens)
        notes["vocab"] = {"size": int(choice.tokens.numel()), "rank": cfg.draft.vocab_rank,
                          "coverage": choice.coverage}
        log.info("draft vocabulary: %s", choice.describe())
    if cfg.draft.init == "target":
        t0 = time.perf_counter()
        report = draft.init_from_target(teacher.init_tensors(), train_docs)
        notes["target_init"] = {"rows": report.rows, "norm_scale": report.norm_scale,
                                "seconds": round(time.perf_counter() - t0, 1)}
        log.info("target initialisation fitted in %.1f s (%s)", time.perf_counter() - t0,
                 ", ".join(f"{k}: {v:,} rows" for k, v in report.rows.items()))
    return notes


def fitted_start(draft: Draft, cfg: TrainConfig, store: DocSource, plan: DataPlan,
                 teacher: TeacherHead, *, writer: bool = True) -> dict[str, Any]:
    """`start_from_data`, or the identical start kept in train.start_cache by an earlier run (lkspec.train.starts).
    Only the `writer` (rank 0) keeps a new one."""
    if cfg.start_cache is None:
        return start_from_data(draft, cfg, store, plan, teacher)
    cache, key = Path(cfg.start_cache), start_key(cfg, store, plan.train_rows, teacher.identity)
    notes = load_start(cache, key, draft)
    if notes is None:
        notes = start_from_data(draft, cfg, store, plan, teacher)
        if writer:
            keep_start(cache, key, draft, notes)
    return notes


def scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    o = cfg.optim
    if o.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, o.warmup_steps, max(1, total_steps))
    return get_constant_schedule_with_warmup(optimizer, o.warmup_steps)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16}[cfg.precision]


def build_setup(config: TrainConfig, run: Path, *, store: DocSource | None, teacher: TeacherHead | None,
                resume: bool, init_from: str | Path | None) -> Setup:
    cfg = config.resolved()
    ctx = DistContext.from_env()
    resume = check_run_dir(run, cfg, resume, init_from)
    store = store if store is not None else open_store(cfg)
    teacher = teacher if teacher is not None else open_teacher(cfg, store, ctx.device)
    store.check_target(teacher.identity)
    if resume:
        check_same_data(run, store)
    K = cfg.draft.num_heads
    plan = plan_data(survey(store, K), num_heads=K, heldout_fraction=cfg.data.heldout_fraction,
                     heldout_max_docs=cfg.data.heldout_max_docs, batch_size=cfg.data.batch_size,
                     batch_tokens=cfg.data.batch_tokens, where=str(store.path))
    dev = ctx.device
    vocab = draft_vocab_size(cfg, teacher.identity)
    draft = new_draft(cfg, teacher.identity, init_from, vocab, teacher.config, teacher.init_tensors)
    store.check_aux_layers(list(draft.aux_layers), f"the {draft.arch} draft")
    fresh = not resume and init_from is None
    notes = fitted_start(draft, cfg, store, plan, teacher, writer=ctx.is_main) if fresh else {}
    if cfg.draft.freeze:
        for p in draft.vocab_parameters():
            p.requires_grad_(False)
    draft = draft.to(dev)
    export_draft = new_draft(cfg, teacher.identity, vocab=vocab, target_config=teacher.config)
    ctx.broadcast_module(draft)
    heads = head_modules(draft)
    fsdp = ctx.active and cfg.parallel == "fsdp"
    if fsdp:
        shard_draft(draft, heads, ctx)
    params = [p for p in dict.fromkeys(draft.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    use_compile = cfg.compile if cfg.compile is not None else dev.type == "cuda"
    trunk = torch.compile(draft.head_states, dynamic=True) if use_compile and not fsdp else draft.head_states
    runner = StepRunner(
        draft, teacher, heads, loss=cfg.loss.name, eta=cfg.eta, gamma=cfg.loss.gamma,
        temperature=cfg.loss.temperature, impl=cfg.loss.impl, micro_batch_tokens=cfg.data.micro_batch_tokens,
        ctx=ctx, device=dev, autocast_dtype=autocast_dtype(cfg, dev), trunk=trunk,
        grad_scale=float(ctx.world) if fsdp else 1.0, lockstep=fsdp,
    )
    return Setup(cfg=cfg, ctx=ctx, resume=resume, store=store, teacher=teacher, plan=plan, draft=draft,
                 export_draft=export_draft, params=params, optimizer=optimizer,
                 scheduler=scheduler(cfg, optimizer, plan.steps_per_epoch * cfg.epochs), runner=runner, fsdp=fsdp,
                 notes=notes)
