"""The training loop: epochs of global batches, metrics, the best draft, checkpoints, exact resume.

A run directory RUN is itself a draft directory (config.json + model.safetensors = the draft with the
best held-out simulated tau so far), plus metrics.jsonl, train_config.yaml, last/ (latest weights as a
draft) and trainer_state/ (everything `--resume` needs). Only rank 0 writes.

Exact resume. The data order of epoch e is a function of (seed, e) alone, the step count fixes the
schedule, and the checkpoint holds the fp32 weights, AdamW moments, RNG states, the batches consumed in
the epoch, the epoch's running metric sums and the byte length of metrics.jsonl. A resumed run cuts
metrics.jsonl back to that length, skips the consumed batches and recomputes what was lost: on CPU the
result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lkspec.data.features import Doc, FeatureStore
from lkspec.drafts import Draft, build_draft, load_draft
from lkspec.errors import LkspecError
from lkspec.io import atomic_dir, atomic_path, read_json
from lkspec.train.batching import DataPlan, DocSource, epoch_seed, global_batches, plan_data, rank_slice, survey
from lkspec.train.checkpoint import (
    LAST_DIR,
    disk_full_error,
    read_trainer_state,
    recover,
    state_dir,
    write_trainer_state,
)
from lkspec.train.config import TrainConfig, changed_keys, config_dict, dump_yaml
from lkspec.train.distributed import DistContext, shard_draft
from lkspec.train.metrics import HeadSums, MetricsLog, total_loss
from lkspec.train.step import StepRunner, head_modules

log = logging.getLogger(__name__)

CONFIG_YAML = "train_config.yaml"
METRICS = "metrics.jsonl"
HELDOUT_CACHE_BYTES = 1 << 30


@dataclass
class TrainResult:
    run: Path
    step: int
    epoch: int
    best_tau: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    draft: Draft | None = None  # the final weights (rank 0; the best ones are in `run`)


def train(config: TrainConfig, out: str | Path, *, store: DocSource | None = None, target: Any = None,
          resume: bool = False, init_from: str | Path | None = None) -> TrainResult:
    """Train a draft into run directory `out`.

    `store` may be any object with the FeatureStore reading interface (e.g. the online mode); `target`
    any object with `.identity` and `.logits_from_hidden` (a `Target` or `targets.LMHead`). Both are
    opened from the config when omitted.
    """
    trainer = Trainer(config, Path(out), store=store, target=target, resume=resume, init_from=init_from)
    try:
        return trainer.run()
    finally:
        trainer.close()


class Trainer:
    def __init__(self, config: TrainConfig, run: Path, *, store: DocSource | None, target: Any,
                 resume: bool, init_from: str | Path | None) -> None:
        self.cfg = cfg = config.resolved()
        self.run_dir = run
        self.ctx = DistContext.from_env()
        self.is_main = self.ctx.is_main
        resume = self._check_run_dir(resume, init_from)
        self.store = store if store is not None else self._open_store()
        self.lm_head = target if target is not None else self._open_target()
        self.identity = self.lm_head.identity
        self.store.check_target(self.identity)
        where = str(getattr(self.store, "path", "the training data"))
        K = cfg.draft.num_heads
        self.plan: DataPlan = plan_data(
            survey(self.store, K), num_heads=K, heldout_fraction=cfg.data.heldout_fraction,
            heldout_max_docs=cfg.data.heldout_max_docs, batch_size=cfg.data.batch_size,
            batch_tokens=cfg.data.batch_tokens, where=where,
        )
        self.total_steps = self.plan.steps_per_epoch * cfg.epochs
        dev = self.ctx.device
        if hasattr(self.lm_head, "to") and not hasattr(self.lm_head, "model"):
            self.lm_head.to(dev)
        self.draft = self._build_draft(init_from).to(dev)
        self.export_draft = self._build_draft(None)  # CPU copy that full state dicts are saved from
        self.ctx.broadcast_module(self.draft)
        heads = head_modules(self.draft)
        self.fsdp = self.ctx.active and cfg.parallel == "fsdp"
        if self.fsdp:
            shard_draft(self.draft, heads, self.ctx)
        self.params = list(dict.fromkeys(self.draft.parameters()))
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
        )
        self.scheduler = self._scheduler()
        autocast = {"fp32": None, "bf16": torch.bfloat16}.get(cfg.precision)
        if cfg.precision == "auto":
            autocast = torch.bfloat16 if dev.type == "cuda" else None
        use_compile = cfg.compile if cfg.compile is not None else dev.type == "cuda"
        trunk = self.draft.head_states
        if use_compile and not self.fsdp:
            trunk = torch.compile(self.draft.head_states, dynamic=True)
        self.runner = StepRunner(
            self.draft, self.lm_head, heads, loss=cfg.loss.name, eta=cfg.eta, gamma=cfg.loss.gamma,
            temperature=cfg.loss.temperature, impl=cfg.loss.impl, micro_batch_tokens=cfg.data.micro_batch_tokens,
            ctx=self.ctx, device=dev, autocast_dtype=autocast, trunk=trunk,
            grad_scale=float(self.ctx.world) if self.fsdp else 1.0, lockstep=self.fsdp,
        )
        # position and running state
        self.step = 0
        self.epoch = 0
        self.batches_done = 0
        self.best_tau: float | None = None
        self.last_ckpt_step: int | None = None
        self.epoch_sums = HeadSums(K)
        self.epoch_loss = torch.zeros(K, 3, dtype=torch.float64)  # count, count*loss_k, count*lambda_k
        self.metrics = MetricsLog(run / METRICS, enabled=self.is_main, tensorboard_dir=run / "tb")
        self._heldout_cache: list[Doc] | None = None
        if resume:
            self._restore()
        elif self.is_main:
            run.mkdir(parents=True, exist_ok=True)
            recover(run)
            self.metrics.truncate(0)  # records of an attempt that never reached a checkpoint
            with atomic_path(run / CONFIG_YAML) as tmp:
                tmp.write_text(dump_yaml(cfg))
        if not resume:
            torch.manual_seed(cfg.seed)

    # ----- setup ------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool, init_from: str | Path | None) -> bool:
        """Whether there is a checkpoint to continue from (else this is a new run)."""
        run = self.run_dir
        if resume and init_from is not None:
            raise LkspecError("--resume continues a run and --init-from starts a new one; pass only one of them")
        if resume:
            d = state_dir(run)
            if d is None:
                if (run / CONFIG_YAML).is_file():  # killed before its first checkpoint: start it over
                    log.info("%s has no checkpoint yet; starting it from step 0", run)
                    return False
                raise LkspecError(f"{run} has no trainer_state/ to resume from; start a new run without --resume")
            saved = read_json(d / "state.json")["config"]
            diffs = changed_keys(saved, config_dict(self.cfg))
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

    def _open_store(self) -> DocSource:
        if not self.cfg.features:
            raise LkspecError("no training features given; pass --features DIR (made by `lkspec data features`)")
        return FeatureStore(self.cfg.features)

    def _open_target(self) -> Any:
        from lkspec.targets import load_lm_head

        spec = self.cfg.target or self.store.identity.name
        try:
            return load_lm_head(spec, device=self.ctx.device)
        except LkspecError as exc:
            if self.cfg.target:
                raise
            raise LkspecError(
                f"the features were made for target {spec!r}, which cannot be opened by that name ({exc}); "
                f"pass --target (its hub id, directory or .gguf)"
            ) from None

    def _build_draft(self, init_from: str | Path | None) -> Draft:
        d = self.cfg.draft
        draft = build_draft(d.arch, seed=self.cfg.seed, hidden_size=self.identity.hidden_size,
                            vocab_size=self.identity.vocab_size, **d.options())
        if init_from is not None:
            src = load_draft(init_from, target=self.identity)
            if src.config != draft.config:
                have = src.config.model_dump(exclude={"hidden_size", "vocab_size"})
                raise LkspecError(
                    f"--init-from {init_from} holds a draft with {have}, which differs from this run's draft "
                    f"options; set draft.* to match it"
                )
            draft.load_state_dict(src.state_dict())
        return draft

    def _scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        o = self.cfg.optim
        if o.schedule == "cosine":
            return get_cosine_schedule_with_warmup(self.optimizer, o.warmup_steps, max(1, self.total_steps))
        return get_constant_schedule_with_warmup(self.optimizer, o.warmup_steps)

    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) CPU state dicts of the draft and optimizer; collective under torchrun."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.fsdp)
        model_sd, optim_sd = get_state_dict(self.draft, self.optimizer, options=opts)
        return {k: v.detach().cpu() for k, v in model_sd.items()}, optim_sd

    def _restore(self) -> None:
        if self.is_main:
            recover(self.run_dir)
        self.ctx.barrier()
        model_sd, optim_sd, state, restore_rng = read_trainer_state(self.run_dir)
        set_state_dict(self.draft, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.best_tau = state["best_tau"]
        self.last_ckpt_step = state["step"]
        self.epoch_sums.t = torch.tensor(state["epoch_sums"], dtype=torch.float64)
        self.epoch_loss = torch.tensor(state["epoch_loss"], dtype=torch.float64)
        self.metrics.truncate(state["metrics_offset"])
        restore_rng()
        if self.is_main:
            log.info("resuming %s at step %d (epoch %d, batch %d)", self.run_dir, self.step, self.epoch + 1,
                     self.batches_done)

    # ----- the loop -----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.is_main and cfg.progress), desc="train")
        stopped = False
        try:
            while self.epoch < cfg.epochs and not stopped:
                seed = epoch_seed(cfg.seed, self.epoch) if cfg.data.shuffle else None
                batches = global_batches(self.store, self.plan.train_rows, seed=seed,
                                         batch_size=cfg.data.batch_size, batch_tokens=cfg.data.batch_tokens)
                for i, batch in enumerate(batches):
                    if i < self.batches_done:
                        continue  # consumed before the checkpoint this run resumed from
                    self._train_step(batch, bar)
                    self.batches_done = i + 1
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._checkpoint()
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        stopped = True
                        break
                if stopped:
                    self._evaluate(kind="stop")
                    self._checkpoint()
                    break
                self._evaluate(kind="epoch")
                self.epoch += 1
                self.batches_done = 0
                self.epoch_sums = HeadSums(cfg.draft.num_heads)
                self.epoch_loss.zero_()
                self._checkpoint()
        finally:
            bar.close()
        from lkspec.train.metrics import read_metrics

        history = read_metrics(self.run_dir / METRICS) if self.is_main else []
        model_sd, _ = self._state_dicts()
        final = None
        if self.is_main:
            self.export_draft.load_state_dict(model_sd)
            final = self.export_draft
        return TrainResult(self.run_dir, self.step, self.epoch, self.best_tau, history, final)

    def _train_step(self, batch: list[Doc], bar: Any) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        mine = rank_slice(batch, self.ctx.rank, self.ctx.world)
        self.optimizer.zero_grad(set_to_none=True)
        sums = self.runner.accumulate(self.runner.pack(mine))
        if not self.fsdp:
            self.ctx.sync_grads(self.params)
        step = self.step + 1
        bad = [k for k in range(1, cfg.draft.num_heads + 1) if not torch.isfinite(sums.t[k - 1]).all()]
        if bad:
            raise self._nonfinite(step, f"head {bad[0]}")
        if cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if not math.isfinite(float(norm)):
            raise self._nonfinite(step, "the gradient (every head's loss was finite)")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step = step
        summary = sums.summary(cfg.loss.name, cfg.eta)
        self.epoch_sums.merge(sums)
        for k in range(cfg.draft.num_heads):
            n = summary["count"][k] or 0
            if n:
                lam = summary["lambda"][k]
                self.epoch_loss[k] += torch.tensor([n, n * summary["loss"][k], n * (lam if lam is not None
                                                                                    else math.nan)],
                                                   dtype=torch.float64)
        tokens = sum(len(d) for d in batch)
        dt = time.perf_counter() - t0
        loss = total_loss(summary["loss"], cfg.loss.gamma)
        if self.step % cfg.log_every == 0:
            self.metrics.write({"kind": "step", "step": self.step, "epoch": self.epoch + 1, "lr": lr, "loss": loss,
                                "train": summary, "perf": {"tokens": tokens, "seconds": dt,
                                                           "tokens_per_s": tokens / dt}})
        alphas = "/".join(f"{a:.2f}" if a is not None else "-" for a in summary["alpha"])
        bar.set_postfix_str(f"ep {self.epoch + 1} loss {loss:.3f} α {alphas} τ {summary['tau']:.2f} "
                            f"{tokens / dt:.0f} tok/s", refresh=False)
        bar.update(1)

    def _nonfinite(self, step: int, what: str) -> LkspecError:
        kept = (f"the last good checkpoint (step {self.last_ckpt_step}) is in {self.run_dir}/{LAST_DIR}"
                if self.last_ckpt_step is not None else "no checkpoint was written yet")
        return LkspecError(
            f"loss became non-finite at step {step} in {what}; {kept}; lower optim.lr or check the features "
            f"for NaN/inf (start a new run, --init-from {self.run_dir}/{LAST_DIR} keeps the weights)"
        )

    # ----- evaluation and metrics ------------------------------------------------------------------
    def _heldout_docs(self) -> list[Doc]:
        if self._heldout_cache is not None:
            return self._heldout_cache
        rows = self.plan.heldout_rows
        docs = [d for d in self.store.iter_docs(seed=None) if d.row in rows] if rows else []
        mine = rank_slice(docs, self.ctx.rank, self.ctx.world)
        nbytes = sum(d.hidden.numel() * d.hidden.element_size() for d in mine)
        if nbytes <= HELDOUT_CACHE_BYTES:
            self._heldout_cache = mine
        return mine

    def _evaluate(self, kind: str) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        train = self.epoch_sums.summary(cfg.loss.name, cfg.eta)
        el = self.epoch_loss
        train["loss"] = [float(el[k, 1] / el[k, 0]) if el[k, 0] > 0 else None for k in range(cfg.draft.num_heads)]
        train["lambda"] = [float(el[k, 2] / el[k, 0]) if el[k, 0] > 0 else None
                           for k in range(cfg.draft.num_heads)]
        heldout = None
        if self.plan.heldout_rows:
            sums = self.runner.evaluate(self.runner.pack(self._heldout_docs()))
            heldout = sums.summary(cfg.loss.name, cfg.eta)
        tau = (heldout or train)["tau"]
        best = self.best_tau is None or tau > self.best_tau
        record = {"kind": kind, "step": self.step, "epoch": self.epoch + 1, "train": train, "heldout": heldout,
                  "selected_by": "heldout" if heldout else "train", "best": best,
                  "perf": {"eval_seconds": time.perf_counter() - t0}}
        self.metrics.write(record)
        if best:
            self.best_tau = tau
            self._save_best(heldout or train, end_of_epoch=kind == "epoch")
        if self.is_main:
            a = "/".join(f"{x:.3f}" for x in (heldout or train)["alpha"] if x is not None)
            log.info("%s %d (step %d): %s alpha %s, tau %.3f%s", kind, self.epoch + 1, self.step,
                     "held-out" if heldout else "train", a, tau, " (best)" if best else "")

    def _meta(self, scores: dict[str, Any] | None = None) -> dict[str, Any]:
        source = getattr(self.store, "index", {}).get("meta", {}) if hasattr(self.store, "index") else {}
        meta: dict[str, Any] = {
            "train": config_dict(self.cfg),
            "data": {"features": str(getattr(self.store, "path", "")) or None, "num_docs": self.plan.num_docs,
                     "num_tokens": self.plan.num_tokens, "train_docs": len(self.plan.train_rows),
                     "heldout_docs": len(self.plan.heldout_rows), "source": source},
            "step": self.step,
            "epoch": self.epoch,  # completed epochs
            "batches_done": self.batches_done,  # batches of the current epoch
        }
        if scores is not None:
            meta["heldout"] = {"alpha": scores["alpha"], "tau": scores["tau"],
                               "split": "heldout" if self.plan.heldout_rows else "train"}
        return meta

    def _save_best(self, scores: dict[str, Any], end_of_epoch: bool) -> None:
        model_sd, _ = self._state_dicts() if self.fsdp else ({k: v.detach().cpu() for k, v in
                                                               self.draft.state_dict().items()}, None)
        if not self.is_main:
            return
        self.export_draft.load_state_dict(model_sd)
        meta = self._meta(scores)
        if end_of_epoch:
            meta["epoch"], meta["batches_done"] = self.epoch + 1, 0
        self._guard_write("best draft", lambda: self.export_draft.save(self.run_dir, target=self.identity,
                                                                       extra=meta))

    # ----- checkpoints ------------------------------------------------------------------------------
    def _guard_write(self, what: str, fn: Any) -> None:
        try:
            fn()
        except OSError as exc:
            raise disk_full_error(exc, what, self.step, self.last_ckpt_step) from None

    def _checkpoint(self) -> None:
        model_sd, optim_sd = self._state_dicts()
        failed: LkspecError | None = None
        if self.is_main:
            self.export_draft.load_state_dict(model_sd)
            meta = self._meta()

            def write_last() -> None:
                with atomic_dir(self.run_dir / LAST_DIR, overwrite=True) as tmp:
                    self.export_draft.save(tmp, target=self.identity, extra=meta)

            state = {
                "format": "lkspec-trainer-state/1", "step": self.step, "epoch": self.epoch,
                "batches_done": self.batches_done, "best_tau": self.best_tau,
                "metrics_offset": self.metrics.offset(), "config": config_dict(self.cfg),
                "scheduler": self.scheduler.state_dict(), "epoch_sums": self.epoch_sums.t.tolist(),
                "epoch_loss": self.epoch_loss.tolist(), "world_size": self.ctx.world,
            }
            try:
                self._guard_write("checkpoint", write_last)
                self._guard_write("checkpoint", lambda: write_trainer_state(
                    self.run_dir, model_sd=model_sd, optim_sd=optim_sd, state=state))
            except LkspecError as exc:
                failed = exc
        if self.ctx.max_int(1 if failed else 0):
            raise failed or LkspecError("rank 0 could not write a checkpoint (see its error); free space and "
                                        "rerun with --resume")
        self.last_ckpt_step = self.step

    def close(self) -> None:
        self.metrics.close()
        self.ctx.close()
