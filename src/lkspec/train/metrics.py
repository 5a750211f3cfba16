"""Per-head metrics kept as sums and counts, so they reduce exactly across micro-batches, steps and ranks.

For each head k: count (valid anchors), sum alpha_t, sum KL_t, sum -log alpha_t, and, for the per-token
hybrid, sum lambda_t and sum of its per-token loss. alpha_k, KL_k, lambda_k and loss_k of any span of
data are functions of these sums; simulated tau = 1 + sum_k prod_{j<=k} alpha_j.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lkspec.losses import LOG_EPS, simulated_tau

FIELDS = ("count", "alpha", "kl", "nll", "lam_tok", "loss_tok")


class HeadSums:
    """[K, len(FIELDS)] float64 sums; `add` takes one head's per-token KL_t and alpha_t."""

    def __init__(self, num_heads: int) -> None:
        self.t = torch.zeros(num_heads, len(FIELDS), dtype=torch.float64)

    @property
    def num_heads(self) -> int:
        return int(self.t.shape[0])

    def add(self, k: int, kl: torch.Tensor, alpha: torch.Tensor, eta: float) -> None:
        if alpha.numel() == 0:
            return
        kl, alpha = kl.detach().double(), alpha.detach().double()
        lam_t = torch.exp(-eta * alpha)
        row = torch.stack([
            alpha.new_tensor(float(alpha.numel())), alpha.sum(), kl.sum(),
            -torch.log(alpha.clamp_min(LOG_EPS)).sum(), lam_t.sum(),
            (lam_t * kl + (1 - lam_t) * (1 - alpha)).sum(),
        ])
        self.t[k - 1] += row.cpu()

    def merge(self, other: HeadSums) -> None:
        self.t += other.t

    def counts(self) -> list[float]:
        return self.t[:, 0].tolist()

    def alphas(self) -> list[float]:
        c = self.t[:, 0]
        return [float(a / n) if n > 0 else math.nan for a, n in zip(self.t[:, 1].tolist(), c.tolist(), strict=True)]

    def summary(self, loss: str, eta: float) -> dict[str, Any]:
        """alpha, lambda, loss, KL per head and simulated tau; lambda/loss as the loss defines them here."""
        out: dict[str, list[float | None]] = {"alpha": [], "kl": [], "lambda": [], "loss": [], "count": []}
        for row in self.t.tolist():
            n, a_sum, kl_sum, nll, lam_tok, loss_tok = row
            if n <= 0:
                for key in out:
                    out[key].append(None if key != "count" else 0)
                continue
            a, kl = a_sum / n, kl_sum / n
            lam, value = head_loss_value(loss, a, kl, nll / n, lam_tok / n, loss_tok / n, eta)
            out["alpha"].append(a)
            out["kl"].append(kl)
            out["lambda"].append(lam)
            out["loss"].append(value)
            out["count"].append(int(n))
        alphas = [a if a is not None else math.nan for a in out["alpha"]]
        return {**out, "tau": simulated_tau(alphas)}  # type: ignore[arg-type]


def head_loss_value(loss: str, alpha: float, kl: float, nll: float, lam_tok: float, loss_tok: float,
                    eta: float) -> tuple[float | None, float]:
    """(lambda, loss_k) from per-head means; lambda from this span's mean alpha, as lk_hybrid does per step."""
    if loss == "kl":
        return None, kl
    if loss == "tv":
        return None, 1.0 - alpha
    if loss == "lk_alpha":
        return None, nll
    if loss == "lk_hybrid":
        lam = math.exp(-eta * alpha)
        return lam, lam * kl + (1 - lam) * (1 - alpha)
    return lam_tok, loss_tok  # lk_hybrid_token


def total_loss(losses: Sequence[float | None], gamma: float) -> float:
    return float(sum(gamma**k * v for k, v in enumerate(losses) if v is not None))


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
        import os

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
