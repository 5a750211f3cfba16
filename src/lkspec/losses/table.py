"""The loss table: one entry per training objective, each a formula over per-head means of KL_t and alpha_t.

Every loss lkspec trains with is a function of a few means over the rows a head's loss covers — mean KL,
mean alpha, mean -log alpha, the batch-mean alpha that lambda is computed from, and for the per-token
hybrid the means of lambda_t and of its per-token mix. So an entry is only that formula (plus a one-line
description and two flags the trainer needs); the same formula then gives the differentiable loss
(`TensorMeans`, over per-token tensors) and the logged metric (`SumMeans` in train/metrics.py, over exact
sums). Adding a loss is one entry here plus its math in the docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from lkspec.errors import LkspecError

Num = torch.Tensor | float
LOG_EPS = 1e-12  # guard for log(alpha) when alpha underflows to 0
GAMMA = 0.8


def lam(alpha_mean: Num, eta: float) -> torch.Tensor:
    """lambda = exp(-eta * sg[alpha]): ~1 (KL) while the draft is poor, -> exp(-eta) (TV) once it is good."""
    a = torch.as_tensor(alpha_mean, dtype=torch.float32)
    return torch.exp(-eta * a.detach())


def hybrid(kl: Num, alpha: Num, w: Num) -> Num:
    """L^lambda = lambda * KL + (1 - lambda) * TV with TV = 1 - alpha (paper eq. 5)."""
    return w * kl + (1.0 - w) * (1.0 - alpha)


def head_weight(k: int, gamma: float = GAMMA) -> float:
    """gamma^(k-1) for head k (1-based): later heads are reached less often, so they matter less."""
    return gamma ** (k - 1)


class Means(Protocol):
    """What a loss formula reads: means over the rows of one head (tensors for training, floats for metrics)."""

    @property
    def kl(self) -> Num: ...

    @property
    def alpha(self) -> Num: ...

    @property
    def batch_alpha(self) -> Num:
        """The mean alpha lambda is computed from: the *global* batch's in training, else these rows'."""
        ...

    @property
    def nll(self) -> Num: ...

    def token_hybrid(self, eta: float) -> tuple[Num, Num]:
        """(mean lambda_t, mean of lambda_t KL_t + (1 - lambda_t)(1 - alpha_t)) with lambda_t = exp(-eta alpha_t)."""
        ...

    @property
    def chain_tv(self) -> Num:
        """Mean of c_t (1 - alpha_t), c_t = sg(dE[tau_t]/d alpha_t) / gamma^(k-1): the chain's own weight of this
        head at anchor t relative to the head's fixed weight (`lkspec.losses.heads.chain_weights`)."""
        ...


@dataclass(frozen=True)
class Loss:
    name: str
    description: str  # one line, for help texts and model cards
    value: Callable[[Means, float], tuple[Num | None, Num]]  # (lambda or None, loss) from the means and eta
    uses_eta: bool = False
    batch_alpha: bool = False  # lambda needs the batch-mean alpha, which the trainer must reduce globally
    chain: bool = False  # reads `chain_tv`: the trainer measures every head's alpha at each anchor first

    def __call__(self, means: Means, eta: float) -> Num:
        return self.value(means, eta)[1]


def _lk_hybrid(m: Means, eta: float) -> tuple[Num, Num]:
    w = lam(m.batch_alpha, eta)
    return w, hybrid(m.kl, m.alpha, w)


def _lk_tau(m: Means, eta: float) -> tuple[Num, Num]:
    """lambda * KL + (1 - lambda) * mean c_t (1 - alpha_t): lk_hybrid with TV's gamma weights replaced by tau's.

    Summed over heads (times gamma^(k-1)) the second part's gradient is -(1 - lambda_k) dE[tau_t]/d theta, the
    expected accepted length of a chained round, E[tau_t] = 1 + sum_k prod_{j<=k} alpha_{t,j}. E[tau] is
    multilinear in the alphas, so its partial derivative in alpha_k *is* the product-sum of the other heads'
    alphas: detaching them (c_t) loses nothing and lets every head backpropagate alone (train/step.py).
    Its value, c_t (1 - alpha_t) = E[tau_t | alpha_{t,k} = 1] - E[tau_t], is the expected length a round loses
    to head k's rejections at anchor t (`lkspec.losses.lk_tau_reference` computes it that way).
    From random init alpha ~ 0 makes c_t ~ 0 for every head but the first, so a pure E[tau] objective would
    not start the later heads; lambda = exp(-eta * sg[mean alpha_k]) ~ 1 keeps KL in charge until they accept.
    """
    w = lam(m.batch_alpha, eta)
    return w, w * m.kl + (1.0 - w) * m.chain_tv


_ENTRIES = [
    Loss("kl", "forward KL divergence to the target (baseline)", lambda m, eta: (None, m.kl)),
    Loss("tv", "total variation distance (1 − α)", lambda m, eta: (None, 1.0 - m.alpha)),
    Loss("lk_alpha", "LK^α: −log of the acceptance rate α", lambda m, eta: (None, m.nll)),
    Loss("lk_hybrid", "Hybrid LK loss with adaptive λ scheduling", _lk_hybrid, uses_eta=True, batch_alpha=True),
    Loss("lk_hybrid_token", "Hybrid LK loss with per-token λ", lambda m, eta: m.token_hybrid(eta), uses_eta=True),
    Loss("lk_tau", "Expected-τ loss: λ·KL + (1 − λ)·(−E[τ]) with the chain's own head weights", _lk_tau,
         uses_eta=True, batch_alpha=True, chain=True),
]
LOSSES: dict[str, Loss] = {e.name: e for e in _ENTRIES}
BASELINE_LOSS = "kl"  # what every comparison is paired against
DEFAULT_LOSS = "lk_hybrid"  # the paper's recommendation (lambda from the batch, eta per architecture)


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]
    except KeyError:
        raise LkspecError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


def check_loss_name(name: str) -> str:
    """The name, if the table has it; pydantic validators and the CLI share this one check."""
    return get_loss(name).name


@dataclass
class TensorMeans:
    """Differentiable means over per-token tensors [n]; `count` and `alpha_mean` may be global (data parallel)."""

    kl_t: torch.Tensor
    alpha_t: torch.Tensor
    count: float | torch.Tensor | None = None
    alpha_mean: torch.Tensor | None = None
    chain_t: torch.Tensor | None = None  # [n] detached c_t of `Means.chain_tv`

    @property
    def n(self) -> torch.Tensor:
        n = float(self.kl_t.numel()) if self.count is None else float(self.count)
        return self.kl_t.new_tensor(n).clamp_min(1.0)

    @property
    def kl(self) -> torch.Tensor:
        return self.kl_t.sum() / self.n

    @property
    def alpha(self) -> torch.Tensor:
        return self.alpha_t.sum() / self.n

    @property
    def batch_alpha(self) -> torch.Tensor:
        return self.alpha if self.alpha_mean is None else self.alpha_mean.to(self.kl_t.device)

    @property
    def nll(self) -> torch.Tensor:
        return -torch.log(self.alpha_t.clamp_min(LOG_EPS)).sum() / self.n

    def token_hybrid(self, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
        w_t = lam(self.alpha_t, eta).to(self.kl_t.device)
        return w_t.mean(), hybrid(self.kl_t, self.alpha_t, w_t).sum() / self.n  # type: ignore[operator]

    @property
    def chain_tv(self) -> torch.Tensor:
        if self.chain_t is None:
            raise LkspecError("this loss weights heads by the chain's acceptance; pass every head's alpha "
                              "(lkspec.losses.chain_weights) as chain_t")
        return (self.chain_t.detach().to(self.alpha_t) * (1.0 - self.alpha_t)).sum() / self.n


def combine(name: str, kl: torch.Tensor, alpha: torch.Tensor, *, eta: float = 3.0,
            count: float | torch.Tensor | None = None, alpha_mean: torch.Tensor | None = None,
            chain: torch.Tensor | None = None) -> torch.Tensor:
    """One head's loss from its per-token KL_t and alpha_t (and, for a chain loss, c_t of `Means.chain_tv`).

    `count` (default: the number of rows) is the denominator of every mean, and `alpha_mean` (default:
    these rows' mean) is what lambda is computed from. Data-parallel training passes the global token
    count and the globally reduced mean so every rank optimises the single-process objective.
    """
    return get_loss(name)(TensorMeans(kl, alpha, count, alpha_mean, chain), eta)  # type: ignore[return-value]
