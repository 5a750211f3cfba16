"""A minimal teacher-forced fit of a draft on cached target samples (for tests and benchmarks only).

`lkspec train` is the trainer. This exists so the evaluation tests and `benchmarks/eval_speed.py` can get
a draft with a non-trivial tau in about a minute on a CPU, from exactly the data the replay already
has: target responses and the target's post-norm hidden states along them. The teacher logits are
computed once and kept in memory (fp16), so each step only costs the draft.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from lkspec.alignment import head_masks, head_targets
from lkspec.drafts import Draft, build_draft
from lkspec.evaluate.samples import Sample
from lkspec.losses import draft_loss
from lkspec.targets import Target


def fit_draft(
    target: Target,
    samples: Sequence[Sample],
    *,
    arch: str = "mlp_speculator",
    num_heads: int = 4,
    steps: int = 200,
    window: int = 48,
    batch: int = 2,
    lr: float = 3e-3,
    loss: str = "lk_hybrid",
    eta: float = 3.0,
    seed: int = 0,
    progress: bool = True,
    **draft_config: object,
) -> Draft:
    """Fit a fresh draft for `steps` Adam steps on random windows of the samples' responses."""
    extra = {"inner_dim": 64} if arch == "mlp_speculator" and not draft_config else dict(draft_config)
    draft = build_draft(arch, hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_heads=num_heads,
                        seed=seed, **extra).to(target.device)
    docs = []
    with torch.no_grad():
        for s in samples:
            if s.n < num_heads + 2:
                continue
            hidden = s.hidden.to(target.device).float()
            teacher = target.logits_from_hidden(hidden).half()
            mask = torch.zeros(s.n + 1, dtype=torch.bool)
            mask[2:] = True  # rows 2.. are response tokens (row 0, 1: the last two prompt tokens)
            docs.append((hidden, s.draft_ids.to(target.device), teacher, mask.to(target.device)))
    if not docs:
        raise ValueError("no sample is long enough to fit a draft on")
    opt = torch.optim.Adam(draft.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    draft.train()
    bar = tqdm(range(steps), desc=f"fitting {arch} ({loss})", disable=not progress, leave=False)
    for _ in bar:
        hs, ids, ts, ms = [], [], [], []
        for _ in range(batch):
            h, i, t, m = docs[int(torch.randint(len(docs), (1,), generator=gen))]
            w = min(window, h.shape[0])
            start = int(torch.randint(h.shape[0] - w + 1, (1,), generator=gen))
            hs.append(h[start : start + w])
            ids.append(i[start : start + w])
            ts.append(t[start : start + w])
            ms.append(m[start : start + w])
        w = min(x.shape[0] for x in hs)
        H, I = torch.stack([x[:w] for x in hs]), torch.stack([x[:w] for x in ids])
        T, M = torch.stack([x[:w] for x in ts]).float(), torch.stack([x[:w] for x in ms])
        logits = draft(H, I)
        total, stats = draft_loss(loss, [z.reshape(-1, z.shape[-1]) for z in logits],
                                  [head_targets(T, k).reshape(-1, T.shape[-1]) for k in range(1, num_heads + 1)],
                                  [m.reshape(-1) for m in head_masks(M, num_heads)], eta=eta)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        bar.set_postfix(loss=f"{float(total.detach()):.3f}", alpha1=f"{stats[0].alpha:.3f}")
    return draft.eval()
