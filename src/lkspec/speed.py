"""The cost model: what drafting K tokens a round buys in wall-clock time, before running it.

τ alone does not say whether speculative decoding pays: a round costs one target pass over K + 1 tokens
plus the draft's proposal, and on a small machine that pass is far from free (2-core CPU, SmolLM2: ~1.9×
a one-token pass at K = 6). With the per-position acceptance the replay or a generator run measured,

    τ(K)       = 1 + Σ_{i ≤ K} P(the first i drafts are all accepted)      (`acceptance_cumulative`)
    round(K)   = pass(K + 1 tokens) + K · propose-per-token + overhead      (seconds, measured)
    speed-up   = τ(K) · plain-seconds-per-token / round(K)

The first i drafts of a K-token round are the same tokens whatever K is (each head sees only what came
before it), so the acceptance measured at the largest K predicts every smaller K. `best_k` maximises the
speed-up; `lkspec generate --k auto` uses it with costs it measures itself and the acceptance of the
rounds so far (`AdaptiveK`), which keeps the output exact: K is chosen before a round's draws. Its pass
costs follow the rounds it has run (`PassTimes`): timed up front in a few seconds they move by ±15 % per
size on a shared host, and a 2-7-token pass costs within that of a one-token pass on the CPU paths, so
that noise alone would decide K.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
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
    the ratios a round sees (timed size by size, a drift lands on some sizes and not on others)."""
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
    return tuple(statistics.median(t[1:]) for t in times)


class PassTimes:
    """Pass costs that follow the verification passes actually run: each size's median over its last
    `window` passes once it has `min_seen` of them; a size not run enough keeps its up-front time, scaled by
    how much slower or faster the run sizes have turned out than their up-front times (the host's drift, so
    that an unused K is not made to look cheap or dear by the clock alone)."""

    def __init__(self, measured: Sequence[float], *, window: int = 64, min_seen: int = 3) -> None:
        self.measured, self.min_seen = tuple(measured), min_seen
        self.seen: list[deque[float]] = [deque(maxlen=window) for _ in self.measured]

    def record(self, tokens: int, seconds: float) -> None:
        """One target pass (+ lm_head) over `tokens` new tokens took `seconds`."""
        if 1 <= tokens <= len(self.seen):
            self.seen[tokens - 1].append(seconds)

    def passes(self) -> tuple[float, ...]:
        run = [statistics.median(s) if len(s) >= self.min_seen else None for s in self.seen]
        ratios = [r / m for r, m in zip(run, self.measured, strict=True) if r is not None and m > 0]
        drift = statistics.median(ratios) if ratios else 1.0
        return tuple(m * drift if r is None else r for r, m in zip(run, self.measured, strict=True))


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
