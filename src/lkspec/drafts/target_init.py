"""Starting a draft from its target: the target's token tables plus least-squares state maps.

A randomly initialised draft must learn 2 x V x D table entries from a few thousand tokens, and most rows
never see a gradient. A target-initialised one starts where the target is: its heads *are* the target's
lm_head, so the only thing to learn is how the target's state moves one token ahead. That move is fitted
in closed form on the training features before the first step (ridge regression of the target's next
normalised state x_{t+1} = h_{t+1} / g on [h_t, e(y_{t+1})], with g the final norm's scale), so an
untrained draft already predicts like a one-step linear model of the target (held-out alpha ~0.31 for
SmolLM2-135M vs ~0.03 at random init). Each architecture turns the fitted maps into its own weights
(`Draft.init_from_target`); this module holds what they share: the normalised states, the token basis
and streamed normal equations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lkspec.data.source import Doc
from lkspec.targets import TargetTensors

RIDGE = 1.0  # L2 penalty of the fits, in units of one squared feature (features are O(1) per coordinate)
MIN_SCALE = 1e-3  # |g| floor: a dead norm dimension carries nothing the head reads


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


@dataclass
class TargetBasis:
    """The target's tables as the fits use them (fp32, CPU)."""

    lm_head: torch.Tensor  # [V, H]
    embedding: torch.Tensor  # [V, H]
    scale: torch.Tensor  # [H]: g, or a constant when the final norm is not RMS-style

    @classmethod
    def of(cls, t: TargetTensors, sample: Iterable[Doc]) -> TargetBasis:
        """`sample`: a few documents, read only when the final norm has no per-dimension scale."""
        if t.norm_scale is not None:
            g = t.norm_scale.float()
            scale = torch.where(g.abs() < MIN_SCALE, torch.full_like(g, MIN_SCALE), g)
        else:  # no per-dimension scale known: the states' mean RMS (the logits' overall temperature)
            rms = torch.cat([d.hidden.float().pow(2).mean(-1).sqrt() for d in sample])
            scale = torch.full((t.lm_head.shape[1],), float(rms.mean()))
        return cls(t.lm_head.float(), t.embedding.float(), scale)

    def state(self, hidden: torch.Tensor) -> torch.Tensor:
        """x = h / g at unit RMS: what the final norm normalised, i.e. what the head must be fed (times g)."""
        return rms_normalise(hidden.float() / self.scale)

    def head(self, rows: torch.Tensor | None) -> torch.Tensor:
        """lm_head * g ([N, H]): logits of a unit-RMS state, over the kept rows (all when None)."""
        w = self.lm_head if rows is None else self.lm_head[rows]
        return w * self.scale


@dataclass
class InitReport:
    """What a fit saw: rows of the normal equations per fitted map."""

    rows: dict[str, int]
    norm_scale: str  # "final norm" or "scalar"


class NormalEquations:
    """Sum of X^T X and X^T Y over streamed rows; `solve` gives the ridge solution B with X B ~ Y."""

    def __init__(self, d_in: int, d_out: int) -> None:
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.xty = torch.zeros(d_in, d_out, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> None:
        x, y = x.double(), y.double()
        self.xtx += weight * (x.T @ x)
        self.xty += weight * (x.T @ y)
        self.rows += x.shape[0]

    def solve(self, ridge: float = RIDGE) -> torch.Tensor:
        eye = torch.eye(self.xtx.shape[0], dtype=torch.float64)
        return torch.linalg.solve(self.xtx + ridge * eye, self.xty).float()

