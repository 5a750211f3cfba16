"""Training objectives for drafts: KL, TV, and the LK losses (arXiv 2602.23881).

Speculative decoding accepts a drafted token with probability min(1, p/q), so the expected acceptance
of one position is alpha = sum_v min(p_v, q_v) = 1 - TV(p, q). KL(p||q) is only a proxy for it. The
LK losses train on alpha itself:

* `lk_alpha`  L = -mean_t log alpha_t   (hyperparameter-free; its gradient is TV's, scaled by 1/alpha)
* `lk_hybrid` L = lambda * KL + (1 - lambda) * (1 - mean alpha), lambda = exp(-eta * sg[mean alpha]),
  one lambda per head per step from the batch (paper eq. 5; the authors' code). Early in training
  alpha ~ 0, lambda ~ 1 and KL's strong gradients do the work; as alpha grows the loss moves to TV.
* `lk_hybrid_token` the per-token-lambda variant (vllm-project/speculators), under its own name.
* `lk_tau` (new; the paper's "future work"): lk_hybrid whose TV part is -E[tau] of a chained round, so each
  head's TV gradient is weighted by tau's own sensitivity dE[tau_t]/d alpha_{t,k} (the other heads' acceptance
  at the same anchor) instead of the fixed gamma^(k-1); KL keeps gamma and the adaptive lambda (cold start).

Every loss is a function of two per-token quantities, KL_t and alpha_t, so the package has one place
that computes them (`kernels`: a readable reference, a vocab-chunked twin and its compiled fusion, with the same
values and gradients), one table that turns their means into each loss (`table.LOSSES`), and the per-head /
multi-head aggregation with gamma^(k-1) weights (`heads`).
"""

from lkspec.losses.heads import (
    AlphaMean,
    HeadStats,
    HeadTerm,
    chain_alphas,
    chain_of,
    chain_weights,
    draft_head_term,
    draft_loss,
    expected_tau,
    head_loss,
    head_weights,
    lk_tau_reference,
    simulated_tau,
)
from lkspec.losses.kernels import (
    IMPLEMENTATIONS,
    check_finite,
    token_stats,
    token_stats_chunked,
    token_stats_fused,
    token_stats_reference,
)
from lkspec.losses.table import (
    BASELINE_LOSS,
    DEFAULT_LOSS,
    GAMMA,
    LOG_EPS,
    LOSSES,
    Loss,
    Means,
    TensorMeans,
    check_loss_name,
    combine,
    get_loss,
    head_weight,
    hybrid,
    lam,
)

__all__ = [
    "BASELINE_LOSS", "DEFAULT_LOSS", "GAMMA", "IMPLEMENTATIONS", "LOG_EPS", "LOSSES", "AlphaMean", "HeadStats",
    "HeadTerm", "Loss", "Means", "TensorMeans", "chain_alphas", "chain_of", "chain_weights", "check_finite",
    "check_loss_name", "combine", "draft_head_term", "draft_loss", "expected_tau", "get_loss", "head_loss",
    "head_weight", "head_weights", "hybrid", "lam", "lk_tau_reference", "simulated_tau", "token_stats",
    "token_stats_chunked", "token_stats_fused", "token_stats_reference",
]
