"""End to end on the embedded target (SmolLM2-135M) with a trained draft: the generator is exact at T = 0,
and generator and coupling replay agree at T = 1 (DESIGN §3's claim, on a real model).

One module fixture samples the target once, trains a small MLP-Speculator on those samples with
`lkspec.train` (a tiny config: K = 3, inner dim 32, ~150 steps) and is shared by the tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lkspec.data.benchmarks import load_benchmark
from lkspec.data.features import FeatureWriter
from lkspec.drafts import Draft, load_draft
from lkspec.evaluate import DraftEntry, Prompt, SampleSettings, eval_settings, evaluate, target_samples
from lkspec.evaluate.replay import draft_traces, rounds_moments
from lkspec.evaluate.report import _ci, _rng
from lkspec.evaluate.samples import Sample
from lkspec.specdec import GenerationResult, SpeculativeGenerator, plain_generate
from lkspec.targets import Target
from lkspec.train import build_config, train

pytestmark = pytest.mark.slow

N_PROMPTS = 4  # per benchmark (mtbench, gsm8k)
MAX_NEW = 32
K = 3


@dataclass
class Trained:
    target: Target
    draft: Draft
    prompts: dict[str, list[Prompt]]


@pytest.fixture(scope="module")
def trained(embedded_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    mp = pytest.MonkeyPatch()
    mp.setenv("LKSPEC_CACHE", str(tmp_path_factory.mktemp("lkspec-cache-slow")))
    t = embedded_target
    prompts = {b: [Prompt(b, r.id, t.render_chat(r.messages)) for r in load_benchmark(b, limit=N_PROMPTS)]
               for b in ("mtbench", "gsm8k")}
    samples: dict[float, list[Sample]] = {0.0: [], 1.0: []}
    for T in samples:
        for ps in prompts.values():  # cached: the replay below reuses these very samples
            samples[T] += target_samples(t, ps, SampleSettings(temperature=T, max_new_tokens=MAX_NEW), batch_size=16,
                                         progress=False).samples
    # trained on the greedy paths only: a draft trained on the T = 1 paths the replay scores would have
    # memorised them, and the replay (on those paths) would overstate the engine's tau (on fresh ones)
    draft = train_on_samples(t, samples[0.0], tmp_path_factory.mktemp("run"))
    yield Trained(t, draft, prompts)
    mp.undo()


def train_on_samples(t: Target, samples: list[Sample], root: Path) -> Draft:
    """A tiny `lkspec train` run on the samples (features written from them), loaded back from its run dir."""
    w = FeatureWriter(root / "features", t.identity, dtype="float32", meta={"source": "eval samples"})
    w.write_shard([s.as_doc(i) for i, s in enumerate(samples) if s.n >= K + 2])
    cfg = build_config(None, {
        "features": str(root / "features"), "draft.num_heads": K, "draft.inner_dim": 32, "loss.name": "kl",
        "epochs": 10, "data.batch_size": 1, "data.heldout_fraction": 0.0, "optim.lr": 1e-2,
        "optim.warmup_steps": 5, "optim.schedule": "constant", "checkpoint_every": 0, "progress": False,
    })
    run = train(cfg, root / "run", target=t).run
    return load_draft(run, target=t.identity)


def _replay_rounds(f: Trained, res: GenerationResult, T: float) -> tuple[float, float]:
    ids = torch.tensor(res.prompt_ids + res.tokens)
    P, n = len(res.prompt_ids), len(res.tokens)
    hidden = f.target.hidden_states(ids[None])[0, P - 2 : P + n - 1]
    (trace,) = draft_traces([f.draft], f.target, Sample("x", "x", P, ids, hidden, res.finished),
                            temperature=T, num_heads=K).drafts
    return rounds_moments(trace.acceptance("sampled", T, K))


def test_generator_is_exact_at_t0_on_the_embedded_target(trained: Trained) -> None:
    f = trained
    gen = SpeculativeGenerator(f.target, f.draft, temperature=0)
    accepted = 0
    for p in f.prompts["gsm8k"][:2]:
        ref, _ = plain_generate(f.target, p.ids, max_new_tokens=MAX_NEW, temperature=0)
        res = gen.generate(p.ids, max_new_tokens=MAX_NEW)
        assert res.tokens == ref
        mean, var = _replay_rounds(f, res, 0.0)
        assert var == 0 and mean == res.rounds  # greedy: the replay's rounds are the engine's, exactly
        accepted += len(res.tokens) - res.rounds
    assert accepted > 0, "the trained draft should get some tokens accepted"


def test_generator_tau_lies_in_replay_ci_at_t1(trained: Trained) -> None:
    f = trained
    settings = eval_settings(benchmarks=list(f.prompts), temperatures=[1.0], rules=["sampled"], k=K,
                             max_new_tokens=MAX_NEW)
    rep = evaluate(f.target, [DraftEntry("trained", "-", f.draft)], settings, progress=False, prompts=f.prompts)
    row = rep.row("trained", "mean", 1.0, "sampled")
    cost = rep.cost
    assert cost.generated_samples == 0  # the fixture's samples were reused from the cache
    gen = SpeculativeGenerator(f.target, f.draft, temperature=1.0)
    z_num, z_var = 0.0, 0.0
    per_prompt: dict[str, list[tuple[int, int]]] = {}
    for bench, ps in f.prompts.items():
        for i, p in enumerate(ps):
            res = gen.generate(p.ids, max_new_tokens=MAX_NEW, seed=100 + i)
            per_prompt.setdefault(bench, []).append((len(res.tokens), res.rounds))
            m, v = _replay_rounds(f, res, 1.0)
            z_num, z_var = z_num + res.rounds - m, z_var + v
    # on the engine's own outputs the replay predicts its rounds up to the acceptance draws
    assert abs(z_num) < 4 * math.sqrt(z_var), (z_num, z_var)
    taus = [sum(n for n, _ in v) / sum(r for _, r in v) for v in per_prompt.values()]
    engine_tau = sum(taus) / len(taus)  # unweighted mean over benchmarks, as the row
    # the engine's tau is an independent estimate with its own noise: bootstrap it over prompts like the row,
    # and require the two estimates to agree within their combined 95% half-width
    draws = []
    for bench, rows in per_prompt.items():
        t, r = np.array(rows, float).T
        idx = _rng(0, "engine", bench).integers(0, len(t), size=(2000, len(t)))
        draws.append(t[idx].sum(1) / r[idx].sum(1))
    elo, ehi = _ci(np.mean(draws, axis=0))
    lo, hi = row["ci95"]
    half = math.hypot((hi - lo) / 2, (ehi - elo) / 2)
    assert row["tau"] > 1.02, "the trained draft should be better than nothing at T = 1"
    assert abs(engine_tau - row["tau"]) <= half, (
        f"engine tau {engine_tau:.3f} [{elo:.3f}, {ehi:.3f}] and replay tau {row['tau']:.3f} [{lo:.3f}, {hi:.3f}] "
        f"differ by more than their combined 95% half-width {half:.3f}")


def test_cli_generate_streams_and_reports(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lkspec.cli import main

    d = trained.draft.save(tmp_path / "draft", target=trained.target.identity)
    main(["generate", str(d), "--prompt", "What is 7 times 8?", "-t", "0", "--max-new-tokens", "16"])
    out = capsys.readouterr().out
    assert "tau" in out and "speed-up" in out and "tok/s" in out and "WARNING" not in out
