"""Per-head metrics kept as sums and counts, so they reduce exactly across micro-batches, steps and ranks.

`HeadSums` holds, per head, the sums every loss formula in `lkspec.losses.table` reads (count, alpha,
KL, -log alpha, and the per-token hybrid's lambda_t and mix); `SumMeans` hands them to the very formula
the training step differentiates, so a logged loss is the trained loss by construction. `EpochStats`
adds the loss as it was optimised step by step (lk_hybrid's lambda changes every step, so an epoch's
loss is not the formula at the epoch's mean alpha). Simulated tau = 1 + sum_k prod_{j<=k} alpha_j.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lkspec.losses import LOG_EPS, get_loss, head_weight, hybrid, lam, simulated_tau

FIELDS = ("count", "alpha", "kl", "nll", "lam_token", "hybrid_token", "chain_tv")
_COL = {name: i for i, name in enumerate(FIELDS)}


@dataclass
class HeadSummary:
    """Per-head means of a span (None where a head saw no valid anchor) and the simulated tau."""

    alpha: list[float | None]
    kl: list[float | None]
    lam: list[float | None]
    loss: list[float | None]
    count: list[int]
    tau: float

    def total_loss(self, gamma: float) -> float:
        return float(sum(head_weight(k, gamma) * v for k, v in enumerate(self.loss, 1) if v is not None))

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl form (key `lambda`, as the file has always had)."""
        return {"alpha": self.alpha, "kl": self.kl, "lambda": self.lam, "loss": self.loss, "count": self.count,
                "tau": self.tau}


@dataclass
class SumMeans:
    """`lkspec.losses.Means` over one head's accumulated sums (a row of `HeadSums`)."""

    row: list[float]

    def _mean(self, name: str) -> float:
        return self.row[_COL[name]] / self.row[_COL["count"]]

    @property
    def kl(self) -> float:
        return self._mean("kl")

    @property
    def alpha(self) -> float:
        return self._mean("alpha")

    @property
    def batch_alpha(self) -> float:
        return self.alpha  # the span is the batch: lambda from this span's mean alpha

    @property
    def nll(self) -> float:
        return self._mean("nll")

    def token_hybrid(self, eta: float) -> tuple[float, float]:
        return self._mean("lam_token"), self._mean("hybrid_token")

    @property
    def chain_tv(self) -> float:
        return self._mean("chain_tv")


class HeadSums:
    """[K, len(FIELDS)] float64 sums (one tensor, so ranks all-reduce it in one call)."""

    def __init__(self, num_heads: int) -> None:
        self.t = torch.zeros(num_heads, len(FIELDS), dtype=torch.float64)

    @property
    def num_heads(self) -> int:
        return int(self.t.shape[0])

    def add(self, k: int, kl: torch.Tensor, alpha: torch.Tensor, eta: float, chain: torch.Tensor | None = None) -> None:
        """Head k's (1-based) per-token KL_t and alpha_t; eta fixes the per-token hybrid's lambda_t; `chain` is
        the c_t of `lkspec.losses.Means.chain_tv` (chain losses only)."""
        if alpha.numel() == 0:
            return
        kl, alpha = kl.detach().double(), alpha.detach().double()
        lam_t = lam(alpha, eta).double()
        row = {"count": float(alpha.numel()), "alpha": alpha.sum(), "kl": kl.sum(),
               "nll": -torch.log(alpha.clamp_min(LOG_EPS)).sum(), "lam_token": lam_t.sum(),
               "hybrid_token": hybrid(kl, alpha, lam_t).sum(),  # type: ignore[union-attr]
               "chain_tv": 0.0 if chain is None else (chain.detach().double().to(alpha.device) * (1.0 - alpha)).sum()}
        self.t[k - 1] += torch.tensor([float(row[name]) for name in FIELDS], dtype=torch.float64)

    def merge(self, other: HeadSums) -> None:
        self.t += other.t

    def column(self, name: str) -> list[float]:
        return self.t[:, _COL[name]].tolist()

    def counts(self) -> list[float]:
        return self.column("count")

    def alphas(self) -> list[float]:
        return [a / n if n > 0 else math.nan for a, n in zip(self.column("alpha"), self.counts(), strict=True)]

    def summary(self, loss: str, eta: float) -> HeadSummary:
        """alpha, lambda, loss and KL per head as the loss table defines them, and simulated tau."""
        entry = get_loss(loss)
        cols: dict[str, list[Any]] = {"alpha": [], "kl": [], "lam": [], "loss": [], "count": []}
        for row in self.t.tolist():
            n = row[_COL["count"]]
            if n <= 0:
                for key in cols:
                    cols[key].append(0 if key == "count" else None)
                continue
            m = SumMeans(row)
            w, value = entry.value(m, eta)
            cols["alpha"].append(m.alpha)
            cols["kl"].append(m.kl)
            cols["lam"].append(None if w is None else float(w))
            cols["loss"].append(float(value))
            cols["count"].append(int(n))
        tau = simulated_tau([a if a is not None else math.nan for a in cols["alpha"]])
        return HeadSummary(**cols, tau=tau)


@dataclass
class EpochStats:
    """One epoch's training metrics: token sums plus the loss and lambda as each step optimised them."""

    tokens: HeadSums
    loss_sum: list[float] = field(default_factory=list)  # sum over steps of count_k * loss_k
    lam_sum: list[float] = field(default_factory=list)  # sum over steps of count_k * lambda_k (nan: no lambda)
    count: list[float] = field(default_factory=list)  # sum over steps of count_k

    @classmethod
    def empty(cls, num_heads: int) -> EpochStats:
        return cls(HeadSums(num_heads), [0.0] * num_heads, [0.0] * num_heads, [0.0] * num_heads)

    def add_step(self, sums: HeadSums, step: HeadSummary) -> None:
        self.tokens.merge(sums)
        for k, n in enumerate(step.count):
            if n:
                w = step.lam[k]
                self.count[k] += n
                self.loss_sum[k] += n * (step.loss[k] or 0.0)
                self.lam_sum[k] += n * (w if w is not None else math.nan)

    def summary(self, loss: str, eta: float) -> HeadSummary:
        s = self.tokens.summary(loss, eta)
        s.loss = [ls / n if n > 0 else None for ls, n in zip(self.loss_sum, self.count, strict=True)]
        s.lam = [lm / n if n > 0 and math.isfinite(lm) else None
                 for lm, n in zip(self.lam_sum, self.count, strict=True)]
        return s

    def state(self) -> dict[str, Any]:
        """trainer_state/state.json's `epoch_sums` and `epoch_loss` ([count, count*loss, count*lambda] per head)."""
        loss_rows = [[n, ls, lm] for n, ls, lm in zip(self.count, self.loss_sum, self.lam_sum, strict=True)]
        return {"epoch_sums": self.tokens.t.tolist(), "epoch_loss": loss_rows}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochStats:
        tokens = HeadSums(len(state["epoch_sums"]))
        saved = torch.tensor(state["epoch_sums"], dtype=torch.float64)
        tokens.t[:, : saved.shape[1]] = saved  # a state saved before a field was added: that field's sums are 0
        rows = state["epoch_loss"]
        return cls(tokens, [r[1] for r in rows], [r[2] for r in rows], [r[0] for r in rows])


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


class MetricsLog:
    """Append-only metrics.jsonl (flushed and fsynced per record), plus TensorBoard when installed.

    Its byte length is stored with every checkpoint, so a resumed run first cuts off what an interrupted
    run wrote after its last checkpoint; the history then matches an uninterrupted run's.
    """

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except Exception:  # tensorboard is optional
                self.tb = None

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        if self.enabled and self.path.exists() and self.path.stat().st_size > offset:
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(clean(record), sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            step = int(record.get("step", 0))
            for split in ("train", "heldout"):
                part = record.get(split)
                if not isinstance(part, dict):
                    continue
                if part.get("tau") is not None:
                    self.tb.add_scalar(f"{split}/tau", part["tau"], step)
                for key in ("alpha", "lambda", "loss", "kl"):
                    for k, v in enumerate(part.get(key) or [], 1):
                        if v is not None:
                            self.tb.add_scalar(f"{split}/{key}_{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
