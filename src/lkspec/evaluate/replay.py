"""Exact acceptance length by coupling replay (DESIGN §3): no round-by-round engine needed.

Speculative decoding with rejection sampling emits tokens distributed exactly as the target, and an
accepted draft token *is* the emitted token. So a whole speculative run can be replayed along one target
sample path y: a round that starts at boundary b (b response tokens emitted) asks head k to predict
response token b+k-1, and given that the engine emits y there, the head is accepted with a known
probability a(b, k):

* `sampled` drafts (Leviathan et al.): min(1, q(y)/p(y)), since P(draft = y and accepted) = min(p, q)(y);
* `greedy` drafts x* = argmax q (vLLM at T > 0): 1[y = x*], since the rejected draft token is zeroed
  out of the resampling distribution;
* at T = 0 both are 1[y = argmax q], y being the target's greedy token.

q is the draft's distribution teacher-forced on y (the accepted prefix is y), p the target's at the same
position, both warped by the same temperature/top-k/top-p. The round ends at the first rejection (that
token is the correction) or after K accepts (+1 bonus). The expected number of rounds then follows
without coin flips from the backward recursion R(b) = 1 + sum_j P(j | b) R(b + j), R(>= n) = 0, and the
per-position counts from the forward visit probabilities of each boundary. tau = sum n / sum R(0).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lkspec.drafts import Draft
from lkspec.errors import LkspecError
from lkspec.evaluate.samples import Sample
from lkspec.proposers import NgramSettings, ngram_proposals
from lkspec.sampling import warp_probs
from lkspec.targets import Target

RULES = ("sampled", "greedy")
"""`sampled`: drafts drawn from q, accepted w.p. min(1, p/q). `greedy`: drafts are argmax q (vLLM's rule)."""


TAU_COUNTS = {"lkspec": 0, "vllm": 1}
"""Where the first round starts (response tokens emitted before it). `lkspec`: at the last prompt token, so the
first response token is drafted too; `vllm`: as vLLM's spec-decode metrics count, after the prefill has emitted
the first response token by itself (that token is in neither the tokens nor the rounds)."""


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise LkspecError(f"unknown acceptance rule {rule!r}; choose from {', '.join(RULES)}")
    return rule


@dataclass
class DraftTrace:
    """A draft along one sample: entry [k-1, b] is head k at round boundary b (predicting response token b+k-1).

    Entries with b + k - 1 >= n (past the end of the response) are invalid and hold 0.
    """

    n: int
    q_y: np.ndarray  # q_k(y)
    p_y: np.ndarray  # p(y) at the same position
    hit: np.ndarray  # 1[argmax q_k == y]
    alpha: np.ndarray  # sum_v min(p, q): one-token acceptance of sampled drafts
    alpha_greedy: np.ndarray  # p(argmax q): one-token acceptance of greedy drafts
    seconds: float = 0.0

    @property
    def num_heads(self) -> int:
        return int(self.q_y.shape[0])

    @property
    def valid(self) -> np.ndarray:
        k = np.arange(1, self.num_heads + 1)[:, None]
        b = np.arange(self.n)[None, :]
        return b + k - 1 < self.n

    def acceptance(self, rule: str, temperature: float, k: int) -> np.ndarray:
        """a(b, i) for i = 1..k as an [n, k] matrix: P(head i accepted | the engine emits y there)."""
        check_rule(rule)
        if temperature == 0 or rule == "greedy":
            a = self.hit.astype(np.float64)
        else:
            # y was drawn from p, so p(y) > 0; the guard only protects against float underflow.
            a = np.minimum(1.0, self.q_y / np.maximum(self.p_y, np.finfo(np.float64).tiny))
            a = np.where(self.p_y > 0, a, (self.q_y > 0).astype(np.float64))
        return np.where(self.valid, a, 0.0)[:k].T.copy()

    def alpha_for(self, rule: str, temperature: float) -> np.ndarray:
        """One-token acceptance rate per (head, anchor) under the rule (the draft-side distribution it uses)."""
        check_rule(rule)
        return self.alpha if rule == "sampled" or temperature == 0 else self.alpha_greedy


FIELDS = ("q_y", "p_y", "hit", "alpha", "alpha_greedy")


@dataclass
class SampleTraces:
    """Every proposer along one sample: the drafts', the n-gram lookup's (if asked) and its proposal lengths."""

    drafts: list[DraftTrace]
    ngram: DraftTrace | None
    ngram_lengths: np.ndarray  # [n] tokens the n-gram lookup proposes at each round boundary (0: no match)
    p_seconds: float


def combine(ngram: DraftTrace, draft: DraftTrace, lengths: np.ndarray) -> DraftTrace:
    """`ngram+draft`: the n-gram's positions where it proposes (k <= its length at b), the draft's after them."""
    k = np.arange(1, ngram.num_heads + 1)[:, None]
    use = k <= lengths[None, :]
    parts = [np.where(use, getattr(ngram, f), getattr(draft, f)) for f in FIELDS]
    return DraftTrace(ngram.n, *parts, seconds=draft.seconds + ngram.seconds)


@torch.no_grad()
def draft_traces(
    drafts: Sequence[Draft],
    target: Target,
    sample: Sample,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    num_heads: int,
    chunk: int = 64,
    ngram: NgramSettings | None = None,
) -> SampleTraces:
    """Teacher-forced pass of every draft along one sample; the target's p is computed once and shared.

    Works through the anchors `chunk` at a time so no [K, n, V] tensor is ever held (K·n·V floats is
    300 MB for K = 6, n = 256 and a 49k vocabulary). Uses only the `draft(hidden, ids)` contract, so any
    Draft (also a test's oracle) can be replayed; a draft that reads aux states (EAGLE-3) gets them
    from one extra target pass over the sample and sees the whole prefix (`first`: the chunk's anchors).
    With `ngram`, the n-gram lookup's proposals along the sample are scored too (q one-hot on each
    proposed token; see lkspec.proposers).
    """
    n, K = sample.n, num_heads
    dev = target.device
    hidden = sample.hidden.to(dev)
    ids = sample.draft_ids.to(dev)
    y = sample.response.to(dev)
    cols = {name: [np.zeros((K, n)) for _ in drafts] for name in FIELDS}
    seconds = [0.0] * len(drafts)
    p_seconds = 0.0
    lengths = np.zeros(n, dtype=np.int64)
    props = torch.zeros(K, n, dtype=torch.long, device=dev)  # [k-1, b]: n-gram token for response token b+k-1
    if ngram is not None:
        t0 = time.perf_counter()
        ids_list = sample.ids.tolist()
        for b, prop in enumerate(ngram_proposals(ids_list[: sample.prompt_len], ids_list[sample.prompt_len :], K,
                                                 ngram)):
            lengths[b] = len(prop)
            if prop:
                props[: len(prop), b] = torch.tensor(prop, device=dev)
        ngram_s = time.perf_counter() - t0
    ng = {name: np.zeros((K, n)) for name in FIELDS}
    aux: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def aux_states(layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's aux states at positions 0 .. P+n-2 from one teacher-forced pass (the sample cache keeps
        only the final states from the response on), and the token ids at the same positions."""
        if layers not in aux:
            full = sample.ids[: sample.prompt_len + n - 1].to(dev)
            aux[layers] = (target.states(full[None], None, layers)[1][0], full)  # type: ignore[index]
        return aux[layers]

    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        hi = min(e + K, n + 1)
        t0 = time.perf_counter()
        p_chunk = warp_probs(target.logits_from_hidden(hidden[s + 1 : hi]), temperature, top_k, top_p)
        p_seconds += time.perf_counter() - t0
        heads = []
        for di, draft in enumerate(drafts):
            t0 = time.perf_counter()
            # a truncated draft is scored over its token map: q is 0 outside it, so nothing there changes a statistic
            run = draft.head_logits if draft.token_map is not None else draft
            if draft.aux_layers:  # it reads aux states and attends: the whole prefix, anchors from s on
                feats, full = aux_states(draft.aux_layers)
                o = sample.prompt_len - 2  # hidden row r is position o + r
                heads.append(run(feats[None, : o + hi], full[None, : o + hi], first=o + s))
            else:
                heads.append(run(hidden[None, s:hi], ids[None, s:hi]))
            seconds[di] += time.perf_counter() - t0
        p_rows: dict[int, torch.Tensor] = {}  # p over each distinct token map's columns (drafts of a study share one)
        for k in range(1, K + 1):  # p and y at the positions head k is tested on, shared by every proposer
            c = min(e, n - k + 1) - s
            if c <= 0:
                continue
            p = p_chunk[k - 1 : k - 1 + c]
            yk = y[s + k - 1 : s + k - 1 + c]
            p_y = p.gather(-1, yk[:, None]).squeeze(-1)
            if ngram is not None:
                d = props[k - 1, s : s + c]
                live = torch.as_tensor(lengths[s : s + c] >= k, device=dev)
                p_d = torch.where(live, p.gather(-1, d[:, None]).squeeze(-1), 0.0)
                hit = (live & (d == yk)).float()
                for name, v in {"q_y": hit, "p_y": p_y, "hit": hit, "alpha": p_d, "alpha_greedy": p_d}.items():
                    ng[name][k - 1, s : s + c] = v.double().cpu().numpy()
            for di, draft in enumerate(drafts):
                t0 = time.perf_counter()
                q = warp_probs(heads[di][k - 1][0, :c], temperature, top_k, top_p)
                m = draft.token_map
                if m is None:
                    x_star, q_y, p_q = q.argmax(-1), q.gather(-1, yk[:, None]).squeeze(-1), p
                else:  # q over the map's rows (ascending ids: the argmax breaks ties as over the vocabulary)
                    x_star = m[q.argmax(-1)]
                    j = torch.searchsorted(m, yk).clamp_max(m.numel() - 1)
                    q_y = torch.where(m[j] == yk, q.gather(-1, j[:, None]).squeeze(-1), 0.0)
                    key = m.data_ptr()
                    if key not in p_rows:
                        p_rows[key] = p_chunk.index_select(-1, m)
                    p_q = p_rows[key][k - 1 : k - 1 + c]
                stats = {
                    "q_y": q_y,
                    "p_y": p_y,
                    "hit": (x_star == yk).float(),
                    "alpha": torch.minimum(p_q, q).sum(-1),
                    "alpha_greedy": p.gather(-1, x_star[:, None]).squeeze(-1),
                }
                for name, v in stats.items():
                    cols[name][di][k - 1, s : s + c] = v.double().cpu().numpy()
                seconds[di] += time.perf_counter() - t0
    traces = [DraftTrace(n, *(cols[name][d] for name in FIELDS), seconds=seconds[d]) for d in range(len(drafts))]
    ngram_trace = DraftTrace(n, *(ng[name] for name in FIELDS), seconds=ngram_s) if ngram is not None else None
    return SampleTraces(traces, ngram_trace, lengths, p_seconds)


# ----------------------------------------------------------------------------------------------
# the recursion
# ----------------------------------------------------------------------------------------------
def round_emission_probs(a: np.ndarray) -> np.ndarray:
    """P(round emits j tokens | boundary b) for j = 1..K+1, as [n, K+1], from a(b, k) [n, K]."""
    n, K = a.shape
    cum = np.cumprod(a, axis=1)
    prev = np.concatenate([np.ones((n, 1)), cum[:, :-1]], axis=1)
    out = np.empty((n, K + 1))
    out[:, :K] = prev * (1.0 - a)
    out[:, K] = cum[:, -1]
    return out


def expected_rounds(a: np.ndarray) -> np.ndarray:
    """R(b) for b = 0..n-1: expected rounds to finish an n-token response from boundary b."""
    n, K = a.shape
    P = round_emission_probs(a)
    R = np.zeros(n + K + 1)
    for b in range(n - 1, -1, -1):
        R[b] = 1.0 + P[b] @ R[b + 1 : b + K + 2]
    return R[:n]


def rounds_moments(a: np.ndarray) -> tuple[float, float]:
    """Mean and variance of the number of rounds along one response (given y, over the acceptance draws).

    The variance is what a round-by-round engine adds on top of the replay's expectation; tests use it
    to compare an engine run with the replay on the very same output tokens.
    """
    n, K = a.shape
    if n == 0:
        return 0.0, 0.0
    P = round_emission_probs(a)
    R = np.zeros(n + K + 1)
    R2 = np.zeros(n + K + 1)
    for b in range(n - 1, -1, -1):
        nxt, nxt2 = R[b + 1 : b + K + 2], R2[b + 1 : b + K + 2]
        R[b] = 1.0 + P[b] @ nxt
        R2[b] = 1.0 + P[b] @ (2.0 * nxt + nxt2)
    return float(R[0]), float(R2[0] - R[0] ** 2)


def visit_probs(a: np.ndarray) -> np.ndarray:
    """Probability that a round starts at boundary b, for b = 0..n-1 (sums to the expected rounds)."""
    n, K = a.shape
    P = round_emission_probs(a)
    V = np.zeros(n + K + 1)
    V[0] = 1.0
    for b in range(n):
        V[b + 1 : b + K + 2] += V[b] * P[b]
    return V[:n]


@dataclass
class PromptReplay:
    """Expected counts for one response (or several, summed): what tau and acceptance are ratios of."""

    tokens: float
    rounds: float
    tried: np.ndarray  # [K] expected rounds in which head k was tested (inside the response)
    accepted: np.ndarray  # [K] expected rounds in which head k was accepted
    alpha_sum: np.ndarray  # [K] sum over anchors of the one-token acceptance rate
    alpha_count: np.ndarray  # [K] number of anchors

    def __add__(self, other: PromptReplay) -> PromptReplay:
        return PromptReplay(self.tokens + other.tokens, self.rounds + other.rounds, self.tried + other.tried,
                            self.accepted + other.accepted, self.alpha_sum + other.alpha_sum,
                            self.alpha_count + other.alpha_count)

    @property
    def tau(self) -> float:
        return self.tokens / self.rounds if self.rounds else float("nan")


def replay_counts(a: np.ndarray, alpha: np.ndarray | None = None) -> PromptReplay:
    """tau's numerator and denominator and the per-position counts for one response, from a [n, K]."""
    n, K = a.shape
    if n == 0:
        z = np.zeros(K)
        return PromptReplay(0.0, 0.0, z, z.copy(), z.copy(), z.copy())
    R = expected_rounds(a)
    V = visit_probs(a)
    cum = np.cumprod(a, axis=1)
    prev = np.concatenate([np.ones((n, 1)), cum[:, :-1]], axis=1)
    valid = (np.arange(n)[:, None] + np.arange(K)[None, :]) < n
    tried = (V[:, None] * prev * valid).sum(0)
    accepted = (V[:, None] * cum * valid).sum(0)
    if alpha is None:
        alpha_sum, count = np.zeros(K), np.zeros(K)
    else:  # alpha is [K, n] with invalid entries ignored
        alpha_sum = (alpha[:K].T * valid).sum(0)
        count = valid.sum(0).astype(np.float64)
    return PromptReplay(float(n), float(R[0]), tried, accepted, alpha_sum, count)


def replay_trace(trace: DraftTrace, rule: str, temperature: float, k: int, count: str = "lkspec") -> PromptReplay:
    """The expected counts of one response under a rule, its rounds counted the `count` way (TAU_COUNTS)."""
    start = TAU_COUNTS[count]
    return replay_counts(trace.acceptance(rule, temperature, k)[start:], trace.alpha_for(rule, temperature)[:, start:])
