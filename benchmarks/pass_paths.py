"""What a cached target pass over 1..K+1 new tokens costs under two CPU fixes lkspec has not adopted yet.

    python benchmarks/pass_paths.py --rounds 2

1. `linear`: `F.linear(x, W)` with a handful of rows takes a slow MKL path on this CPU (SmolLM2's 49152 x 576
   lm_head: 10-38 ms at 1-7 rows, against 3.4-15 ms for `(W @ x.T).T`, which for one row is fastest padded to
   two). `fast` routes every linear with <= 16 rows through `(W @ x.T).T`.
2. `gqa`: with a mask present (every multi-token pass), transformers' SDPA path copies the whole KV cache per
   layer to repeat the grouped KV heads (`use_gqa_in_sdpa` is False whenever a mask is given);
   `TRANSFORMERS_SDPA_FORCE_GQA=1` passes `enable_gqa` instead.

Each configuration's logits of one cached 7-token pass (masked, 7 rows: the shape both fixes change) are
compared with the stock ones.

Configurations are interleaved round-robin in one process, so a drifting host slows them alike.
"""

from __future__ import annotations

import argparse
import os

import torch

from lkspec.speed import measure_pass_costs
from lkspec.targets import Target, cached_decoder, load_target

_linear = torch.nn.functional.linear


def fast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    m = x.numel() // x.shape[-1]
    if m > 16 or x.device.type != "cpu":
        return _linear(x, w, b)
    x2 = x.reshape(m, x.shape[-1])
    if m == 1:  # one row takes MKL's gemv, slower here than a two-row product
        x2 = torch.cat([x2, x2])
    y = (w @ x2.t()).t()[:m]
    if b is not None:
        y = y + b
    return y.reshape(*x.shape[:-1], w.shape[0])


@torch.no_grad()
def verify_logits(target: Target, ids: torch.Tensor, context: int = 200) -> torch.Tensor:
    """Logits of a verification-shaped pass: the tokens after `context` cached ones."""
    from transformers import DynamicCache

    decoder, cache = cached_decoder(target.model), DynamicCache(config=target.model.config)
    decoder(input_ids=ids[:, :context], cache=cache, use_cache=True)
    hs = decoder(input_ids=ids[:, context:], cache=cache, use_cache=True).last_hidden_state
    return target.logits_from_hidden(hs[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    target = load_target(args.target)
    ids = torch.randint(0, target.vocab_size, (1, 207), generator=torch.Generator().manual_seed(0))
    logits = {}
    for _ in range(args.rounds):
        for gqa in ("0", "1"):
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = gqa
            for name, lin in (("stock", _linear), ("fast", fast_linear)):
                torch.nn.functional.linear = lin
                passes = measure_pass_costs(target, args.max_tokens, reps=11)
                logits[gqa, name] = verify_logits(target, ids.to(target.device))
                print(f"gqa={gqa} linear={name:5s} ms", [round(p * 1e3, 1) for p in passes],
                      "relative", [round(p / passes[0], 2) for p in passes], flush=True)
    torch.nn.functional.linear = _linear
    ref = logits["0", "stock"]
    for key, value in logits.items():
        print("max |logit - stock|", key, float((value - ref).abs().max()))


if __name__ == "__main__":
    main()
