"""Batched decoding over the target's KV cache that keeps the post-norm states it sampled from.

Both places where the target answers prompts use it: evaluation (`evaluate.samples`: the coupling replay needs
the states at the response's positions) and regeneration's `hf` backend (`data.backends`: a feature store needs
the states at every position of prompt and response, so keeping them spares the teacher-forced pass that would
compute them again, `data.states`).

Each row samples from its own `torch.Generator`, one uniform per token through the inverse CDF: a row's tokens do
not depend on the rows beside it or on the batch size, and a step costs one cumulative sum where
`torch.multinomial` draws an exponential per vocabulary entry (13 % of HF `generate`'s time at 32 x 49152 on the
2-core CPU; this loop is 1.16x HF `generate`'s speed at T = 1 and 0.98x at T = 0, benchmarks/regen_loop.py).
Finished rows leave the batch (the cache is sliced).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lkspec.errors import LkspecError
from lkspec.sampling import check_temperature, warp_probs
from lkspec.targets.kv_cache import new_cache
from lkspec.targets.model import Target, cached_decoder, select_features

Keep = Literal["tail", "all"]


@dataclass
class Decoded:
    """One prompt's response and the target's post-norm states along it (on the CPU, in the target's dtype)."""

    tokens: list[int]
    hidden: torch.Tensor  # "tail": [n + 1, H], positions P-2 .. P+n-2; "all": [P + n, H], positions 0 .. P+n-1
    aux: torch.Tensor | None  # "all" with aux layers: their input states [P + n, A*H] (EAGLE-3's features)
    finished: bool  # the response ends with an EOS token (else it hit max_new_tokens)


def sample_rows(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row by the inverse CDF, each row with its own generator (batch-independent draws)."""
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators]).to(probs.device)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def decode_batch(
    target: Target,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    on_step: Callable[[int], None] | None = None,
    keep: Keep = "tail",
    aux_layers: Sequence[int] = (),
) -> list[Decoded]:
    """Answer a batch of prompts (greedy at T = 0); `keep` chooses which states come back (see `Decoded`).

    "tail" keeps what the replay reads: the states from the second-to-last prompt position on. "all" keeps every
    position's, the last emitted token's included, which costs one more single-token pass per row.
    """
    check_temperature(temperature)
    if temperature > 0 and (generators is None or len(generators) != len(prompts)):
        raise ValueError("sampling at T > 0 needs one generator per prompt")
    if any(len(p) < 2 for p in prompts):
        raise LkspecError("every prompt needs at least 2 tokens (render it with the target's chat template)")
    keep_all = keep == "all"
    want_aux = keep_all and bool(aux_layers)
    B, dev = len(prompts), target.device
    eos = torch.tensor(target.eos_token_ids, device=dev)
    Pm = max(len(p) for p in prompts)
    ids = torch.full((B, Pm), target.pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, Pm, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Pm - len(p) :] = torch.tensor(list(p))
        mask[i, Pm - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    decoder = cached_decoder(target.model)
    cache = new_cache(target.model.config, Pm + max_new_tokens + 1)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                  output_hidden_states=want_aux)
    h = out.last_hidden_state
    if keep_all:
        hidden = [[h[i, Pm - len(p) :]] for i, p in enumerate(prompts)]
        a = select_features(out, aux_layers) if want_aux else None
        aux = [[a[i, Pm - len(p) :]] for i, p in enumerate(prompts)] if a is not None else None
    else:
        hidden, aux = [[h[i, -2:]] for i in range(B)], None
    tokens: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    active = list(range(B))  # original row of each batch row
    last_h = h[:, -1]
    next_pos = pos[:, -1] + 1

    def feed(tok: torch.Tensor) -> None:
        """One cached pass over each active row's newest token; its state joins that row's states."""
        nonlocal mask, last_h, next_pos
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
        o = decoder(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None], cache=cache,
                    use_cache=True, output_hidden_states=want_aux)
        last_h = o.last_hidden_state[:, -1]
        next_pos = next_pos + 1
        a = select_features(o, aux_layers)[:, -1] if want_aux else None
        for j, i in enumerate(active):
            hidden[i].append(last_h[j : j + 1])
            if aux is not None and a is not None:
                aux[i].append(a[j : j + 1])

    for step in range(max_new_tokens):
        probs = warp_probs(target.logits_from_hidden(last_h), temperature, top_k, top_p)
        if temperature == 0:
            tok = probs.argmax(-1)
        else:
            assert generators is not None
            tok = sample_rows(probs, [generators[i] for i in active])
        done = torch.isin(tok, eos)
        stay = []
        for j, i in enumerate(active):
            tokens[i].append(int(tok[j]))
            if bool(done[j]):
                finished[i] = True
            else:
                stay.append(j)
        if on_step is not None:
            on_step(len(active))
        last = not stay or step == max_new_tokens - 1
        if keep_all:  # every emitted token's own state as well, the rows that just finished included
            feed(tok)
        if last:
            break
        if len(stay) < len(active):
            sel = torch.tensor(stay, device=dev)
            cache.batch_select_indices(sel)
            tok, mask, next_pos, last_h = tok[sel], mask[sel], next_pos[sel], last_h[sel]
            active = [active[j] for j in stay]
        if not keep_all:
            feed(tok)
    result = []
    for i in range(B):
        n = len(tokens[i])
        states = torch.cat(hidden[i])
        result.append(Decoded(tokens[i], (states if keep_all else states[: n + 1]).cpu(),
                              torch.cat(aux[i]).cpu() if aux is not None else None, finished[i]))
    return result
