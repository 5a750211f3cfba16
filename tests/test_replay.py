"""The coupling replay's math (DESIGN §3): engine vs coin-flip replay vs recursion, and edge cases.

The simulation is DESIGN §3's: a Markov target over V = 6 tokens, a chained draft (each drafted token
conditions on the previous drafted one), K = 4. A real round-by-round engine (Leviathan accept/resample,
or vLLM's greedy drafts) and the replay along target sample paths must give the same tau and the same
per-position acceptance.
"""

from __future__ import annotations

import numpy as np
import pytest

from lkspec.evaluate.replay import (
    expected_rounds,
    replay_counts,
    round_emission_probs,
    visit_probs,
)

V, K = 6, 4


def _chains(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(V, 0.5), size=V)  # target transitions p(. | previous token)
    noise = rng.dirichlet(np.full(V, 0.5), size=V)
    Q = 0.6 * P + 0.4 * noise  # an imperfect draft of the same chain
    return P, Q


def _engine(P: np.ndarray, Q: np.ndarray, n: int, rule: str, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """Round-by-round speculative decoding; returns (rounds, accepted-per-position counts [K], tried [K])."""
    x, emitted, rounds = 0, 0, 0
    tried, accepted = np.zeros(K), np.zeros(K)
    while emitted < n:
        rounds += 1
        prev, drafts, qs = x, [], []
        for _ in range(K):
            q = Q[prev] if rule == "sampled" else np.eye(V)[Q[prev].argmax()]
            d = int(rng.choice(V, p=q)) if rule == "sampled" else int(q.argmax())
            drafts.append(d)
            qs.append(q)
            prev = d
        prev, out = x, []
        for i, d in enumerate(drafts):
            p = P[prev]
            if emitted + i < n:
                tried[i] += 1
            if rng.random() < min(1.0, p[d] / qs[i][d]):
                out.append(d)
                if emitted + i < n:
                    accepted[i] += 1
                prev = d
                continue
            resid = np.maximum(p - qs[i], 0.0)
            out.append(int(rng.choice(V, p=resid / resid.sum())))
            break
        else:
            out.append(int(rng.choice(V, p=P[prev])))
        emitted += len(out)
        x = out[-1]
    return rounds, np.stack([accepted, tried])


def _acceptance_matrix(P: np.ndarray, Q: np.ndarray, y: np.ndarray, rule: str) -> np.ndarray:
    """a(b, k) along y (y[-1] := the start token 0): what the evaluator computes from p and q."""
    n = len(y)
    prevs = np.concatenate([[0], y[:-1]])
    a = np.zeros((n, K))
    for b in range(n):
        for k in range(1, K + 1):
            i = b + k - 1
            if i >= n:
                break
            prev, tok = prevs[i], y[i]
            a[b, k - 1] = min(1.0, Q[prev, tok] / P[prev, tok]) if rule == "sampled" else float(Q[prev].argmax() == tok)
    return a


def _coin_flip_rounds(a: np.ndarray, rng: np.random.Generator) -> int:
    n, rounds, b = a.shape[0], 0, 0
    while b < n:
        rounds += 1
        j = K + 1
        for k in range(1, K + 1):
            if rng.random() >= a[b, k - 1]:
                j = k
                break
        b += j
    return rounds


@pytest.mark.parametrize("rule", ["sampled", "greedy"])
def test_engine_replay_and_recursion_agree(rule: str) -> None:
    P, Q = _chains()
    rng = np.random.default_rng(1)
    n, paths = 200, 60
    eng_tau, rep_tau, rec_tau = [], [], []
    eng_pos = np.zeros((2, K))
    rec = None
    for _ in range(paths):
        r, counts = _engine(P, Q, n, rule, rng)
        eng_tau.append(n / r)
        eng_pos += counts
        y, x = np.empty(n, dtype=int), 0
        for i in range(n):
            x = int(rng.choice(V, p=P[x]))
            y[i] = x
        a = _acceptance_matrix(P, Q, y, rule)
        rep_tau.append(n / _coin_flip_rounds(a, rng))
        c = replay_counts(a)
        rec = c if rec is None else rec + c
        rec_tau.append(c.tau)
    assert rec is not None
    eng, rep = np.mean(eng_tau), np.mean(rep_tau)
    rec_mean = float(np.mean(rec_tau))
    se = np.std(eng_tau) / np.sqrt(paths) + np.std(rep_tau) / np.sqrt(paths)
    assert abs(eng - rec_mean) < 4 * se, (eng, rep, rec_mean, se)
    assert abs(rep - rec_mean) < 4 * se, (eng, rep, rec_mean, se)
    # the recursion removes the coin flips: its spread over paths is smaller than the engine's
    assert np.std(rec_tau) < np.std(eng_tau)
    # per-position conditional acceptance: engine counts vs the replay's expected counts
    eng_cond = eng_pos[0] / eng_pos[1]
    rec_cond = rec.accepted / rec.tried
    assert np.allclose(eng_cond, rec_cond, atol=0.05), (eng_cond, rec_cond)
    if rule == "sampled":
        assert 2.0 < rec.tau < 4.0  # a meaningful regime (the draft is good but not perfect)
    else:
        assert rec.tau < 2.0  # greedy drafts hide most of the overlap at T = 1


def test_recursion_edge_cases() -> None:
    n = 10
    zero = np.zeros((n, K))
    assert np.allclose(expected_rounds(zero), np.arange(n, 0, -1))  # every round emits exactly one token
    assert replay_counts(zero).tau == 1.0
    one = np.ones((n, K))
    assert expected_rounds(one)[0] == np.ceil(n / (K + 1))
    c = replay_counts(one)
    assert c.rounds == 2 and np.all(c.accepted == c.tried)
    # rows of P sum to one, and the visit probabilities add up to the expected rounds
    a = np.random.default_rng(0).random((n, K))
    assert np.allclose(round_emission_probs(a).sum(1), 1.0)
    assert np.isclose(visit_probs(a).sum(), expected_rounds(a)[0])


def test_recursion_matches_closed_form_for_constant_acceptance() -> None:
    """With a constant a and a long response, tau -> 1 + sum_k a^k (the chain formula)."""
    a_val, n = 0.7, 5000
    c = replay_counts(np.full((n, K), a_val))
    assert abs(c.tau - (1 + sum(a_val**k for k in range(1, K + 1)))) < 2e-3
    assert np.allclose(c.accepted / c.tried, a_val, atol=1e-3)
