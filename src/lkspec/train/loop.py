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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from tqdm.auto import tqdm

from lkspec.data.features import Doc
from lkspec.data.source import data_identity
from lkspec.drafts import Draft
from lkspec.errors import LkspecError
from lkspec.io import atomic_dir, atomic_path
from lkspec.train.batching import DocSource, epoch_seed, global_batches, rank_slice
from lkspec.train.checkpoint import LAST_DIR, disk_full_error, read_trainer_state, recover, write_trainer_state
from lkspec.train.config import CONFIG_YAML, TrainConfig, config_dict, dump_yaml
from lkspec.train.metrics import EpochStats, HeadSummary, MetricsLog, read_metrics
from lkspec.train.setup import METRICS, TeacherHead, build_setup

log = logging.getLogger(__name__)

HELDOUT_CACHE_BYTES = 1 << 30
# Divergence: a step loss this many times the run's lowest, or weights this many times their starting norm.
# Healthy runs move neither by more than a few times; a too-high learning rate moves both by orders of
# magnitude within a few steps, and every later checkpoint would save the wreck as if it were training.
# The starting norm is floored at an RMS of DIVERGED_RMS_FLOOR per weight: a draft whose trainable weights
# all start at zero (MEDUSA's residual blocks over a frozen target head) has no norm to be a multiple of.
DIVERGED_LOSS = 100.0
DIVERGED_NORM = 1000.0
DIVERGED_RMS_FLOOR = 0.01


@dataclass
class TrainResult:
    run: Path
    step: int
    epoch: int
    best_tau: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    draft: Draft | None = None  # the final weights (rank 0; the best ones are in `run`)


def train(config: TrainConfig, out: str | Path, *, store: DocSource | None = None, target: TeacherHead | None = None,
          resume: bool = False, init_from: str | Path | None = None) -> TrainResult:
    """Train a draft into run directory `out`.

    `store` is any `DocSource` (a FeatureStore, or the online mode); `target` a `Target` or `targets.LMHead`
    already on the training device. Both are opened from the config when omitted.
    """
    trainer = Trainer(config, Path(out), store=store, target=target, resume=resume, init_from=init_from)
    try:
        return trainer.run()
    finally:
        trainer.close()


class Trainer:
    """The loop over one `Setup`: the run's position (step, epoch, batch), its metrics and its checkpoints."""

    def __init__(self, config: TrainConfig, run: Path, *, store: DocSource | None, target: TeacherHead | None,
                 resume: bool, init_from: str | Path | None) -> None:
        self.s = s = build_setup(config, run, store=store, teacher=target, resume=resume, init_from=init_from)
        self.cfg, self.run_dir, self.ctx = s.cfg, run, s.ctx
        self.step = self.epoch = self.batches_done = 0
        self.best_tau: float | None = None
        self.last_ckpt_step: int | None = None
        self.min_loss = math.inf
        self.epoch_stats = EpochStats.empty(self.cfg.draft.num_heads)
        self.metrics = MetricsLog(run / METRICS, enabled=s.ctx.is_main, tensorboard_dir=run / "tb")
        self._heldout_cache: list[Doc] | None = None
        self.notes = s.notes  # how the draft started; kept in the checkpoint so resumed runs record it too
        if s.resume:
            self._restore()
        else:
            self._start()
        self.start_norm = 0.0 if s.fsdp else self._weight_norm()  # DTensor shards: only the loss is checked
        self.norm_limit = DIVERGED_NORM * max(self.start_norm,
                                              DIVERGED_RMS_FLOOR * math.sqrt(sum(p.numel() for p in s.params)))

    @property
    def draft(self) -> Draft:
        return self.s.draft

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.s.optimizer

    def _start(self) -> None:
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            recover(self.run_dir)
            self.metrics.truncate(0)  # records of an attempt that never reached a checkpoint
            with atomic_path(self.run_dir / CONFIG_YAML) as tmp:
                tmp.write_text(dump_yaml(self.cfg))
        torch.manual_seed(self.cfg.seed)
        if self.cfg.draft.init == "target":
            self._evaluate(kind="init")  # what the fitted start predicts before any gradient step

    def _restore(self) -> None:
        if self.ctx.is_main:
            recover(self.run_dir)
        self.ctx.barrier()
        model_sd, optim_sd, state, restore_rng = read_trainer_state(self.run_dir)
        set_state_dict(self.s.draft, self.s.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        self.s.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.best_tau = state["best_tau"]
        self.last_ckpt_step = state["step"]
        self.epoch_stats = EpochStats.from_state(state)
        self.notes = state.get("notes", {})
        self.metrics.truncate(state["metrics_offset"])
        restore_rng()
        if self.ctx.is_main:
            log.info("resuming %s at step %d (epoch %d, batch %d)", self.run_dir, self.step, self.epoch + 1,
                     self.batches_done)

    # ----- the loop -----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        bar = tqdm(total=self.s.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.ctx.is_main and cfg.progress), desc="train")
        try:
            while self.epoch < cfg.epochs:
                seed = epoch_seed(cfg.seed, self.epoch) if cfg.data.shuffle else None
                batches = global_batches(self.s.store, self.s.plan.train_rows, seed=seed,
                                         batch_size=cfg.data.batch_size, batch_tokens=cfg.data.batch_tokens)
                for i, batch in enumerate(batches):
                    if i < self.batches_done:
                        continue  # consumed before the checkpoint this run resumed from
                    self._train_step(batch, bar)
                    self.batches_done = i + 1
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self._checkpoint()
                    if cfg.max_steps is not None and self.step >= cfg.max_steps:
                        self._evaluate(kind="stop")
                        self._checkpoint()
                        return self._result()
                self._evaluate(kind="epoch")
                self.epoch += 1
                self.batches_done = 0
                self.epoch_stats = EpochStats.empty(cfg.draft.num_heads)
                self._checkpoint()
        finally:
            bar.close()
        return self._result()

    def _result(self) -> TrainResult:
        history = read_metrics(self.run_dir / METRICS) if self.ctx.is_main else []
        model_sd, _ = self._state_dicts()
        final = None
        if self.ctx.is_main:
            self.s.export_draft.load_state_dict(model_sd)
            final = self.s.export_draft
        return TrainResult(self.run_dir, self.step, self.epoch, self.best_tau, history, final)

    def _train_step(self, batch: list[Doc], bar: Any) -> None:
        cfg, s = self.cfg, self.s
        t0 = time.perf_counter()
        s.optimizer.zero_grad(set_to_none=True)
        sums = s.runner.accumulate(s.runner.pack(rank_slice(batch, self.ctx.rank, self.ctx.world)))
        if not s.fsdp:
            self.ctx.sync_grads(s.params)
        step = self.step + 1
        bad = [k for k in range(1, cfg.draft.num_heads + 1) if not torch.isfinite(sums.t[k - 1]).all()]
        if bad:
            raise self._nonfinite(step, f"head {bad[0]}")
        if cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.optim.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in s.params if p.grad is not None])
        if not math.isfinite(float(norm)):
            raise self._nonfinite(step, "the gradient (every head's loss was finite)")
        lr = s.scheduler.get_last_lr()[0]
        s.optimizer.step()
        s.scheduler.step()
        self.step = step
        summary = sums.summary(cfg.loss.name, cfg.eta)
        self.epoch_stats.add_step(sums, summary)
        tokens = sum(len(d) for d in batch)
        dt = time.perf_counter() - t0
        loss = summary.total_loss(cfg.loss.gamma)
        self._check_divergence(loss)
        if self.step % cfg.log_every == 0:
            self.metrics.write({"kind": "step", "step": self.step, "epoch": self.epoch + 1, "lr": lr, "loss": loss,
                                "train": summary.record(), "perf": {"tokens": tokens, "seconds": dt,
                                                                    "tokens_per_s": tokens / dt}})
        alphas = "/".join(f"{a:.2f}" if a is not None else "-" for a in summary.alpha)
        bar.set_postfix_str(f"ep {self.epoch + 1} loss {loss:.3f} α {alphas} τ {summary.tau:.2f} "
                            f"{tokens / dt:.0f} tok/s", refresh=False)
        bar.update(1)

    def _kept(self) -> str:
        if self.last_ckpt_step is None:
            return "no checkpoint was written yet"
        return (f"the last good checkpoint (step {self.last_ckpt_step}) is in {self.run_dir}/{LAST_DIR} and the best "
                f"held-out draft in {self.run_dir} (a new run with --init-from either keeps its weights)")

    def _nonfinite(self, step: int, what: str) -> LkspecError:
        return LkspecError(f"loss became non-finite at step {step} in {what}; lower optim.lr or check the features "
                           f"for NaN/inf; {self._kept()}")

    def _weight_norm(self) -> float:
        with torch.no_grad():
            return float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.detach().float()) for p in self.s.params])))

    def _check_divergence(self, loss: float) -> None:
        """Stop a run whose loss or weights have blown up (see DIVERGED_*) instead of saving it as trained."""
        self.min_loss = min(self.min_loss, loss)
        low = max(self.min_loss, 1e-3)
        norm = self._weight_norm() if self.step % self.cfg.log_every == 0 and not self.s.fsdp else 0.0
        if loss > DIVERGED_LOSS * low:
            what = f"the loss rose to {loss:.3g}, {loss / low:.0f}x its lowest ({self.min_loss:.3g})"
        elif not math.isfinite(norm) or norm > self.norm_limit:
            what = f"the weights' norm grew to {norm:.3g} from {self.start_norm:.3g}"
        else:
            return
        raise LkspecError(f"training diverged at step {self.step}: {what}; lower optim.lr (now {self.cfg.optim.lr:g}); "
                          f"{self._kept()}")

    # ----- evaluation and the best draft -------------------------------------------------------------
    def _heldout_docs(self) -> list[Doc]:
        if self._heldout_cache is not None:
            return self._heldout_cache
        rows = self.s.plan.heldout_rows
        docs = [d for d in self.s.store.iter_docs(seed=None) if d.row in rows] if rows else []
        mine = rank_slice(docs, self.ctx.rank, self.ctx.world)
        if sum(d.hidden.numel() * d.hidden.element_size() for d in mine) <= HELDOUT_CACHE_BYTES:
            self._heldout_cache = mine
        return mine

    def _evaluate(self, kind: str) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        train = self.epoch_stats.summary(cfg.loss.name, cfg.eta)
        heldout: HeadSummary | None = None
        if self.s.plan.heldout_rows:
            runner = self.s.runner
            heldout = runner.evaluate(runner.pack(self._heldout_docs())).summary(cfg.loss.name, cfg.eta)
        scores = heldout or train
        best = self.best_tau is None or scores.tau > self.best_tau
        self.metrics.write({"kind": kind, "step": self.step, "epoch": self.epoch + 1, "train": train.record(),
                            "heldout": heldout.record() if heldout else None,
                            "selected_by": "heldout" if heldout else "train", "best": best,
                            "perf": {"eval_seconds": time.perf_counter() - t0}})
        if best:
            self.best_tau = scores.tau
            self._save_best(scores, end_of_epoch=kind == "epoch")
        if self.ctx.is_main:
            a = "/".join(f"{x:.3f}" for x in scores.alpha if x is not None)
            log.info("%s %d (step %d): %s alpha %s, tau %.3f%s", kind, self.epoch + 1, self.step,
                     "held-out" if heldout else "train", a, scores.tau, " (best)" if best else "")

    def _meta(self, scores: HeadSummary | None = None) -> dict[str, Any]:
        plan, store = self.s.plan, self.s.store
        meta: dict[str, Any] = {
            "train": config_dict(self.cfg),
            "data": {"features": data_identity(store)["path"], "num_docs": plan.num_docs, "num_tokens": plan.num_tokens,
                     "train_docs": len(plan.train_rows), "heldout_docs": len(plan.heldout_rows),
                     "source": store.meta},
            "draft_start": self.notes,
            "step": self.step,
            "epoch": self.epoch,  # completed epochs
            "batches_done": self.batches_done,  # batches of the current epoch
        }
        if scores is not None:
            meta["heldout"] = {"alpha": scores.alpha, "tau": scores.tau,
                               "split": "heldout" if plan.heldout_rows else "train"}
        return meta

    def _save_best(self, scores: HeadSummary, end_of_epoch: bool) -> None:
        model_sd = self._state_dicts()[0] if self.s.fsdp else {k: v.detach().cpu()
                                                               for k, v in self.s.draft.state_dict().items()}
        if not self.ctx.is_main:
            return
        self.s.export_draft.load_state_dict(model_sd)
        meta = self._meta(scores)
        if end_of_epoch:
            meta["epoch"], meta["batches_done"] = self.epoch + 1, 0
        self._guard_write("best draft", lambda: self.s.export_draft.save(self.run_dir, target=self.s.identity,
                                                                         extra=meta))

    # ----- checkpoints ------------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) CPU state dicts of the draft and optimizer; collective under torchrun."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=self.s.fsdp)
        model_sd, optim_sd = get_state_dict(self.s.draft, self.s.optimizer, options=opts)
        return {k: v.detach().cpu() for k, v in model_sd.items()}, optim_sd

    def _guard_write(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except OSError as exc:
            raise disk_full_error(exc, what, self.step, self.last_ckpt_step) from None

    def _checkpoint(self) -> None:
        model_sd, optim_sd = self._state_dicts()
        failed: LkspecError | None = None
        if self.ctx.is_main:
            export = self.s.export_draft
            export.load_state_dict(model_sd)
            meta = self._meta()

            def write_last() -> None:
                with atomic_dir(self.run_dir / LAST_DIR, overwrite=True) as tmp:
                    export.save(tmp, target=self.s.identity, extra=meta)

            state = {
                "format": "lkspec-trainer-state/1", "step": self.step, "epoch": self.epoch,
                "batches_done": self.batches_done, "best_tau": self.best_tau,
                "metrics_offset": self.metrics.offset(), "config": config_dict(self.cfg),
                "scheduler": self.s.scheduler.state_dict(), **self.epoch_stats.state(), "world_size": self.ctx.world,
                "notes": self.notes, "data": data_identity(self.s.store),
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
