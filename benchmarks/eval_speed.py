"""Wall time of the coupling replay vs the round-by-round engine, for the same prompts and equal CI width.

    python benchmarks/eval_speed.py                      # embedded target, a draft trained here, ~3 min
    python benchmarks/eval_speed.py --draft RUN_DIR --prompts 8 --max-new-tokens 64

Both measure tau for the same prompts at the same temperature. The engine (`lkspec generate`'s
SpeculativeGenerator) runs N/tau sequential target passes per response; the replay pays a one-time
target sampling (reported separately: it is shared by every draft, loss, K and rule evaluated later,
and cached) and then one teacher-forced draft pass per response. The engine's tau keeps the acceptance
coin flips the replay integrates out; at equal CI width it needs (w_engine / w_replay)^2 times as many
prompts (both widths are bootstrap estimates over few prompts, so that factor is itself noisy).
Numbers are ratios measured side by side in one run (the machine may be shared).
The default draft is trained on the same T = 1 paths the replay scores (cheapest), so its replay tau
is biased upward against the engine's fresh responses; it is a timing benchmark, not an agreement test
(tests/test_evaluate_slow.py is).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lkspec.data.benchmarks import load_benchmark
from lkspec.data.features import FeatureWriter
from lkspec.drafts import load_draft
from lkspec.evaluate import DraftEntry, Prompt, SampleSettings, eval_settings, evaluate, target_samples
from lkspec.evaluate.report import _ci, _rng
from lkspec.specdec import SpeculativeGenerator
from lkspec.targets import load_target
from lkspec.train import build_config, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default=None, help="draft dir (default: train a tiny one here)")
    ap.add_argument("--benchmarks", default="mtbench,gsm8k")
    ap.add_argument("--prompts", type=int, default=6, help="prompts per benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--train-epochs", type=int, default=5, help="epochs of the tiny training run")
    args = ap.parse_args()

    target = load_target(args.target)
    os.environ["LKSPEC_CACHE"] = tempfile.mkdtemp(prefix="lkspec-eval-speed-")  # a cold sample cache
    benches = args.benchmarks.split(",")
    prompts = {b: [Prompt(b, r.id, target.render_chat(r.messages)) for r in load_benchmark(b, limit=args.prompts)]
               for b in benches}
    T = args.temperature

    t0 = time.perf_counter()
    samples = []
    for ps in prompts.values():
        samples += target_samples(target, ps, SampleSettings(temperature=T, max_new_tokens=args.max_new_tokens),
                                  batch_size=16).samples
    t_sampling = time.perf_counter() - t0
    n_tokens = sum(s.n for s in samples)

    if args.draft:
        draft = load_draft(args.draft, target=target.identity)
        fit_s = 0.0
    else:
        t0 = time.perf_counter()
        root = Path(tempfile.mkdtemp(prefix="lkspec-eval-speed-run-"))
        w = FeatureWriter(root / "features", target.identity, dtype="float32", meta={"source": "eval samples"})
        w.write_shard([s.as_doc(i) for i, s in enumerate(samples) if s.n >= args.k + 2])
        cfg = build_config(None, {
            "features": str(root / "features"), "draft.num_heads": args.k, "draft.inner_dim": 32, "loss.name": "kl",
            "epochs": args.train_epochs, "data.batch_size": 1, "data.heldout_fraction": 0.0, "optim.lr": 1e-2,
            "optim.warmup_steps": 5, "optim.schedule": "constant", "checkpoint_every": 0,
        })
        draft = load_draft(train(cfg, root / "run", target=target).run, target=target.identity)
        fit_s = time.perf_counter() - t0

    # the replay: everything after the (cached) samples, for one draft
    t0 = time.perf_counter()
    settings = eval_settings(benchmarks=benches, temperatures=[T], rules=["sampled"], k=args.k,
                             max_new_tokens=args.max_new_tokens)
    rep = evaluate(target, [DraftEntry("draft", args.draft or "trained here", draft)], settings, prompts=prompts)
    t_replay = time.perf_counter() - t0
    assert rep.cost.generated_samples == 0
    row = rep.row("draft", "mean", T, "sampled")
    w_replay = row["ci95"][1] - row["ci95"][0]

    # the engine on the same prompts
    gen = SpeculativeGenerator(target, draft, k=args.k, temperature=T)
    gen.generate(prompts[benches[0]][0].ids, max_new_tokens=2, seed=0)  # warm-up
    t0 = time.perf_counter()
    per: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for b, ps in prompts.items():
        toks, rnds = [], []
        for i, p in enumerate(ps):
            res = gen.generate(p.ids, max_new_tokens=args.max_new_tokens, seed=1000 + i)
            toks.append(len(res.tokens))
            rnds.append(res.rounds)
        per[b] = (np.array(toks, float), np.array(rnds, float))
    t_engine = time.perf_counter() - t0
    engine_tau = float(np.mean([t.sum() / r.sum() for t, r in per.values()]))
    draws = []
    for b, (t, r) in per.items():
        idx = _rng(0, "engine", b).integers(0, len(t), size=(2000, len(t)))
        draws.append(t[idx].sum(1) / r[idx].sum(1))
    lo, hi = _ci(np.mean(draws, axis=0))
    w_engine = hi - lo

    equal_width_engine = t_engine * (w_engine / w_replay) ** 2
    print()
    print(f"target {target.name}, {sum(len(p) for p in prompts.values())} prompts ({','.join(benches)}), "
          f"T={T:g}, K={args.k}, {n_tokens} response tokens; draft training {fit_s:.0f} s (not counted)")
    print(f"one-time target sampling (batched, cached, shared by every draft): {t_sampling:7.1f} s")
    print(f"replay, per draft:   {t_replay:7.1f} s   tau {row['tau']:.3f}  CI [{row['ci95'][0]:.3f}, "
          f"{row['ci95'][1]:.3f}]  width {w_replay:.3f}")
    print(f"engine, same prompts:{t_engine:7.1f} s   tau {engine_tau:.3f}  CI [{lo:.3f}, {hi:.3f}]  "
          f"width {w_engine:.3f}")
    print(f"engine at the replay's CI width: {equal_width_engine:.1f} s (x{(w_engine / w_replay) ** 2:.2f} prompts)")
    print(f"speed-up of the replay per draft: {t_engine / t_replay:.1f}x at equal prompts, "
          f"{equal_width_engine / t_replay:.1f}x at equal CI width; "
          f"including the one-time sampling: {equal_width_engine / (t_replay + t_sampling):.1f}x")


if __name__ == "__main__":
    main()
