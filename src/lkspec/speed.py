"""The cost model: what drafting K tokens a round buys in wall-clock time, before running it.

τ alone does not say whether speculative decoding pays: a round costs one target pass over K + 1 tokens
plus the draft's proposal, and on a small machine that pass is far from free (2-core CPU, SmolLM2: ~1.9×
a one-token pass at K = 6 with stock kernels, ~1.3× on `lkspec.cpu_paths`). With the per-position
acceptance the replay or a generator run measured,

    τ(K)       = 1 + Σ_{i ≤ K} P(the first i drafts are all accepted)      (`acceptance_cumulative`)
    round(K)   = pass(K + 1 tokens) + K · propose-per-token + overhead      (seconds, measured)
    speed-up   = τ(K) · plain-seconds-per-token / round(K)

The first i drafts of a K-token round are the same tokens whatever K is (each head sees only what came
before it), so the acceptance measured at the largest K predicts every smaller K. `best_k` maximises the
speed-up; `lkspec generate --k auto` uses it with costs it measures itself and the acceptance of the
rounds so far (`AdaptiveK`), which keeps the output exact: K is chosen before a round's draws. Its pass
costs are the ones timed up front, all sizes round-robin at the same moments: per-size medians of the passes
a run has made were tried and made `--k auto` slower (docs/evaluation.md), because each size's window then
holds other minutes of a host whose speed drifts, the size-by-size error the round-robin timing removes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lkspec.targets import Target, cached_decoder, crop_cache

AUTO = "auto"  # `--k auto`


@dataclass(frozen=True)
class Costs:
    """Seconds on this machine: `passes[n - 1]` is a target pass (with its lm_head) over n new tokens."""

    passes: tuple[float, ...]
    propose_per_token: float = 0.0  # the draft's forward and draw, per drafted token
    overhead: float = 0.0  # the round's own work: acceptance tests, draws, cache crop
    plain_per_token: float | None = None  # plain decoding's seconds per token; default: passes[0]

    @classmethod
    def measured(cls, passes: tuple[float, ...], phases: dict[str, float], rounds: int, drafted: int,
                 plain_per_token: float | None = None) -> Costs:
        """Costs from `generate`'s phase seconds summed over `rounds` rounds that drafted `drafted` tokens:
        propose per drafted token, and the round's own work (accept + bookkeeping) per round."""
        return cls(passes, phases.get("propose", 0.0) / max(drafted, 1),
                   (phases.get("accept", 0.0) + phases.get("bookkeeping", 0.0)) / max(rounds, 1), plain_per_token)

    def round(self, k: int) -> float:
        return self.passes[k] + k * self.propose_per_token + self.overhead

    def relative(self) -> list[float]:
        """pass(k + 1 tokens) / pass(1 token) for k = 0 .. len - 1: what verification costs here."""
        return [c / self.passes[0] for c in self.passes]


def expected_tau(cumulative: Sequence[float], k: int) -> float:
    """Tokens per round with K = k drafts: the bonus/correction token plus every accepted prefix."""
    return 1.0 + sum(cumulative[:k])


def predicted_speedup(cumulative: Sequence[float], k: int, costs: Costs) -> float:
    plain = costs.plain_per_token if costs.plain_per_token is not None else costs.passes[0]
    return expected_tau(cumulative, k) * plain / costs.round(k)


def best_k(cumulative: Sequence[float], costs: Costs, k_max: int) -> int:
    """The K in 1..k_max with the highest predicted speed-up (ties: the smaller K)."""
    ks = range(1, min(k_max, len(cumulative), len(costs.passes) - 1) + 1)
    return max(ks, key=lambda k: (round(predicted_speedup(cumulative, k, costs), 9), -k))


@torch.no_grad()
def verify_pass_logits(target: Target, ids: torch.Tensor, context: int) -> torch.Tensor:
    """Target logits [n, V] of a verification-shaped pass: the n = len - `context` tokens of `ids` [1, len]
    after `context` cached ones (masked, several rows: the shape the generator's rounds have)."""
    from transformers import DynamicCache

    decoder, cache = cached_decoder(target.model), DynamicCache(config=target.model.config)
    decoder(input_ids=ids[:, :context], cache=cache, use_cache=True)
    hs = decoder(input_ids=ids[:, context:], cache=cache, use_cache=True).last_hidden_state
    return target.logits_from_hidden(hs[0])


@torch.no_grad()
def measure_pass_costs(target: Target, max_tokens: int, *, context: int = 200, reps: int = 9) -> tuple[float, ...]:
    """Median seconds of a cached target pass (+ lm_head) over n = 1 .. max_tokens new tokens after `context`
    tokens, the shape of a verification pass in the middle of a response.

    The sizes are timed round-robin (1, 2, .., max_tokens, then again), not one size after another: this
    host's speed drifts by tens of percent within a minute, and only ratios taken at the same moments are
    the ratios a round sees (timed size by size, a drift lands on some sizes and not on others). For the
    same reason each size's cost is taken relative to the one-token pass of its own round (`paired_costs`)."""
    from transformers import DynamicCache

    decoder = cached_decoder(target.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (1, context + max_tokens), generator=g).to(target.device)
    cache = DynamicCache(config=target.model.config)
    decoder(input_ids=ids[:, :context], cache=cache, use_cache=True)
    times: list[list[float]] = [[] for _ in range(max_tokens)]
    for _ in range(reps + 1):  # the first round is a warm-up of every shape
        for n in range(1, max_tokens + 1):
            t0 = time.perf_counter()
            hs = decoder(input_ids=ids[:, context:context + n], cache=cache, use_cache=True).last_hidden_state
            target.logits_from_hidden(hs[0]).argmax(-1).tolist()  # waits for the device, as a round does
            times[n - 1].append(time.perf_counter() - t0)
            crop_cache(cache, context)
    return paired_costs([t[1:] for t in times])


def paired_costs(times: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """Seconds per size from round-robin timings `times[size][round]`: the one-token pass's median times the
    median over rounds of each size's ratio to that round's one-token pass. Medians taken size by size pick
    different rounds, so a slowdown that starts inside a round (this host's speed moves within seconds) moves
    one size and not the next; on the embedded target, six back-to-back measurements of a 3-token pass read
    0.93-1.32 one-token passes by separate medians and 1.08-1.23 by paired ratios (2026-12-04)."""
    one = times[0]
    return tuple(statistics.median(one) * statistics.median(a / b for a, b in zip(t, one, strict=True))
                 for t in times)


class AdaptiveK:
    """`--k auto`: each round's K from the acceptance of the rounds before it and the measured costs.

    A position's conditional acceptance counts only the rounds that reached it, plus one pseudo-try at the
    rate of the position before it (`prior` for the first): an unmeasured position is expected to do as
    well as the last measured one, so a draft that keeps being accepted is given more tokens and one that
    is not is cut back, and the first round already uses the K that the prior's costs favour instead of
    paying for K_max while nothing is known. The generator keeps one per kind of round when the n-gram
    lookup is on (rounds where the context has a match, rounds where it has none): a copied continuation
    is accepted far more often than a draft's guess, so it earns a larger K.
    """

    def __init__(self, costs: Costs, k_max: int, prior: float = 0.5) -> None:
        self.costs, self.k_max, self.prior = costs, k_max, prior
        self.tried = [0] * k_max
        self.accepted = [0] * k_max

    @property
    def k(self) -> int:
        """The next round's K: the best predicted speed-up under the acceptance so far and `costs`."""
        return best_k(self.cumulative(), self.costs, self.k_max)

    def cumulative(self) -> list[float]:
        """P(the first i drafts are all accepted), i = 1..k_max, as estimated so far."""
        out, run, rate = [], 1.0, self.prior
        for a, t in zip(self.accepted, self.tried, strict=True):
            rate = (a + rate) / (t + 1)
            run *= rate
            out.append(run)
        return out

    def update(self, drafted: int, accepted: int) -> int:
        """Record one round (tokens drafted, drafts accepted); the next K. The generator keeps `costs` current
        (`Costs.measured` from its phase seconds), shared by every estimator of a run."""
        for i in range(min(drafted, accepted + 1)):
            self.tried[i] += 1
            self.accepted[i] += i < accepted
        return self.k
